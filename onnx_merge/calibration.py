"""Calibration inputs served in batches, with mixed samples added; several tensors of a model
read in one onnxruntime run.

A few hundred calibration samples pin a wide consumer down poorly, and a least-squares fit or
a block refinement on them overfits. The original model gives a target for any input, not
only for the samples given, so the set is enlarged with convex combinations of two of its
samples, lam * x_i + (1 - lam) * x_j with lam ~ U(0, 1) (mixup, Zhang et al. 2018). They stay
between real samples, and the fits must agree with the original model there too.

Only floating-point inputs can be mixed: a model taking token ids or masks as integers is
calibrated on its samples alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from .graph import GraphIndex
from .runtime import make_session


class CalibrationSet:
    """``feeds`` (input name -> array, samples first) in batches of ``batch``: the samples as
    given, and ``mixed_copies`` times as many mixed ones. Every pass over it yields the same
    batches, so statistics gathered layer by layer see the same rows."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int, mixed_copies: int = 1, seed: int = 0):
        self.feeds = feeds
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


def truncated(model: onnx.ModelProto, taps: list[str]) -> bytes:
    """A model computing only ``taps``: the nodes they depend on, their weights, the graph
    inputs. Several taps are read in one onnxruntime run."""
    index = GraphIndex(model)
    needed, stack = set(), list(taps)
    while stack:
        node = index.producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(
        nodes, model.graph.name, [i for i in model.graph.input if i.name in used or i.name not in index.initializers],
        [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in dict.fromkeys(taps)],
        [t for t in model.graph.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version).SerializeToString()


class Taps:
    """One onnxruntime session computing several intermediate tensors of a model at once."""

    def __init__(self, model: onnx.ModelProto, taps: list[str]):
        self.taps = list(dict.fromkeys(taps))
        self.session = make_session(truncated(model, self.taps), optimize=True)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.taps, self.session.run(self.taps, {k: feeds[k] for k in self.inputs})))
