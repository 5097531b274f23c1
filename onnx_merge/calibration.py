"""Calibration inputs served in batches, with mixed samples added; several tensors of a model
read in one onnxruntime run, starting from tensors an earlier run left where they are still valid.

A few hundred calibration samples pin a wide consumer down poorly, and a least-squares fit or
a block refinement on them overfits. The original model gives a target for any input, not
only for the samples given, so the set is enlarged with convex combinations of two of its
samples, lam * x_i + (1 - lam) * x_j with lam ~ U(0, 1) (mixup, Zhang et al. 2018). They stay
between real samples, and the fits must agree with the original model there too.

Only floating-point inputs can be mixed: a model taking token ids or masks as integers is
calibrated on its samples alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx

from .graph import GraphIndex
from .runtime import make_session


class CalibrationSet:
    """``feeds`` (input name -> array, samples first) in batches of ``batch``: the samples as
    given, and ``mixed_copies`` times as many mixed ones. Every pass over it yields the same
    batches, so statistics gathered layer by layer see the same rows."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int, mixed_copies: int = 1, seed: int = 0,
                 cache: "ActivationCache | None" = None):
        self.feeds = feeds
        self.cache = cache  # the model being compressed: its tensors on these batches, where still valid
        self.batch = batch
        self.samples = len(next(iter(feeds.values())))
        mixable = all(np.issubdtype(v.dtype, np.floating) for v in feeds.values())
        copies = mixed_copies if mixable and self.samples > 1 else 0
        rng = np.random.default_rng(seed)
        self.pairs = [(rng.permutation(self.samples), rng.uniform(0.0, 1.0, self.samples)) for _ in range(copies)]

    @property
    def mixed(self) -> int:
        """How many mixed samples there are (consumers with rows enough do not read them)."""
        return self.samples * len(self.pairs)

    @property
    def batch_count(self) -> int:
        return -(-self.samples // self.batch)

    @property
    def mixed_batch_count(self) -> int:
        return len(self.pairs) * self.batch_count

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The samples as given."""
        for start in range(0, self.samples, self.batch):
            yield {k: v[start:start + self.batch] for k, v in self.feeds.items()}

    def mixed_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The mixed samples (none where the inputs cannot be mixed)."""
        for partner, lam in self.pairs:
            for start in range(0, self.samples, self.batch):
                rows = slice(start, start + self.batch)
                yield {k: mix(v[rows], v[partner[rows]], lam[rows]) for k, v in self.feeds.items()}


def mix(a: np.ndarray, b: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """lam * a + (1 - lam) * b, one lam per sample (the leading axis), in a's dtype."""
    weight = lam.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
    return weight * a + (1 - weight) * b


def truncated(model: onnx.ModelProto, taps: list[str], cut: dict[str, np.dtype] | None = None) -> bytes:
    """A model computing only ``taps``: the nodes they depend on, their weights, the graph
    inputs. Several taps are read in one onnxruntime run. The tensors in ``cut`` (name -> dtype)
    become inputs: what computes them is left out."""
    cut = cut or {}
    index = GraphIndex(model)
    needed, stack = set(), [t for t in taps if t not in cut]
    while stack:
        node = index.producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i and i not in cut)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input} | set(taps)
    inputs = [i for i in model.graph.input if i.name in used or i.name not in index.initializers]
    inputs += [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d)), None)
               for t, d in cut.items() if t in used]
    graph = onnx.helper.make_graph(
        nodes, model.graph.name, inputs,
        [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in dict.fromkeys(taps)],
        [t for t in model.graph.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version).SerializeToString()


def fingerprint(index: GraphIndex, tensor: str) -> int:
    """A hash of everything that computes ``tensor``: the nodes upstream of it and their weights.
    A cached value of the tensor is valid while this is unchanged."""
    parts, seen, stack = [], set(), [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.initializers:
            t = index.initializers[name]
            parts.append(t.raw_data if t.HasField("raw_data") else t.SerializeToString())
            continue
        node = index.producer.get(name)
        if node is not None:
            parts.append(node.SerializeToString())
            stack.extend(i for i in node.input if i)
        else:
            parts.append(name.encode())  # a graph input
    return hash(tuple(parts))


class ActivationCache:
    """Tensors of the model being compressed on every calibration batch, kept to start later runs
    from: calibrating group after group then costs about one pass over the calibration set, not
    a pass of everything before each group. Each tensor is kept with its ``fingerprint`` and used
    only while that still matches (a rewrite upstream of it makes it stale); at most ``limit``
    bytes are held, the oldest dropped first."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: dict[tuple[str, str], tuple[int, list[np.ndarray]]] = {}  # (pass, tensor) -> (fingerprint, batches)
        self.started_from = 0  # runs that began at cached tensors, for the report

    def taps(self, model: onnx.ModelProto, taps: list[str], kind: str, batches: int, keep: Iterable[str] = ()
             ) -> "CachedTaps":
        """Taps of ``model`` for a pass of ``kind`` ("real", "mixed") over ``batches`` batches,
        starting from the valid cached tensors nearest to them; ``keep``: taps to cache for later."""
        index = GraphIndex(model)
        cut, stack, seen = {}, list(taps), set()
        while stack:
            name = stack.pop()
            if name in seen or name in index.initializers:
                continue
            seen.add(name)
            entry = self._entries.get((kind, name))
            if entry is not None and len(entry[1]) == batches:
                if entry[0] == fingerprint(index, name):
                    cut[name] = entry[1]
                    continue
                del self._entries[(kind, name)]  # stale: something upstream was rewritten
            node = index.producer.get(name)
            if node is not None:
                stack.extend(i for i in node.input if i)
        self.started_from += bool(cut)
        kept = {} if self.limit <= 0 else {  # a cache that holds nothing hashes nothing
            t: fingerprint(index, t) for t in dict.fromkeys(keep)
            if t in taps and t not in cut and t in index.producer}  # a graph input is fed anyway
        return CachedTaps(self, model, list(taps), kind, cut, kept)

    def store(self, kind: str, name: str, print_: int, values: list[np.ndarray]) -> None:
        self._entries.pop((kind, name), None)
        self._entries[(kind, name)] = (print_, values)
        while len(self._entries) > 1 and self.nbytes() > self.limit:
            del self._entries[next(iter(self._entries))]
        if self.nbytes() > self.limit:
            self._entries.clear()

    def nbytes(self) -> int:
        return sum(a.nbytes for _, values in self._entries.values() for a in values)


class CachedTaps:
    """One pass's taps over the calibration batches (see ActivationCache.taps)."""

    def __init__(self, cache: ActivationCache, model, taps, kind, cut, kept):
        self.cache, self.kind, self.cut, self.kept = cache, kind, cut, kept
        self.taps = list(dict.fromkeys(taps))
        computed = [t for t in self.taps if t not in cut]
        self.inner = Taps(model, computed, {t: v[0].dtype for t, v in cut.items()}) if computed else None
        self.values: dict[str, list] = {t: [] for t in kept}

    def over(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Each batch's taps; the kept ones are cached once every batch has been run."""
        b = -1
        for b, feeds in enumerate(batches):
            out = {t: v[b] for t, v in self.cut.items() if t in self.taps}
            if self.inner is not None:
                out.update(self.inner.run({**feeds, **{t: v[b] for t, v in self.cut.items()}}))
            for t in self.kept:
                self.values[t].append(out[t])
            yield out
        for t, print_ in self.kept.items():
            if len(self.values[t]) == b + 1:
                self.cache.store(self.kind, t, print_, self.values[t])


class Taps:
    """One onnxruntime session computing several intermediate tensors of a model at once (from
    the tensors in ``cut``, name -> dtype, fed as inputs)."""

    def __init__(self, model: onnx.ModelProto, taps: list[str], cut: dict[str, np.dtype] | None = None):
        self.taps = list(dict.fromkeys(taps))
        self.session = make_session(truncated(model, self.taps, cut), optimize=True)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.taps, self.session.run(self.taps, {k: feeds[k] for k in self.inputs})))
