"""Attention layers and their heads, found by following where each projection channel goes.

    x -> Q/K/V projections (or one fused QKV) -> Reshape/Transpose/Split ... -> Q @ K^T -> [scale,
    mask] -> Softmax -> @ V -> Transpose/Reshape ... -> output projection

The layout ops between the projections and the two attention MatMuls only move values. Every
one is run on an array of element ids (with the graph's inputs' free dims fixed), so the
channels each attention batch index reads are known exactly, whatever reshapes, permutes, splits
or slices the exporter wrote. A head is a set of batch indices that read the same Q, K and V
channels; its output reaches the output projection through the same kind of path, which names
the projection's input rows it owns. Removing head h then means: drop its Q, K and V columns and
its output-projection rows, and scale every shape axis that carries heads by H'/H. Anything the
ids cannot prove (a reader outside the block, a computed shape that cannot be rewritten, a mask
that varies per head) leaves the layer whole with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import GRAPH_OUTPUT, GraphIndex, attr
from .groups import Layer, Rejected, describe_layer
from .shapes import skeleton

LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather", "Identity",
          "Dropout", "Cast"}
ELEMENTWISE = {"Mul", "Div", "Add", "Sub"}
SCORE_OPS = ELEMENTWISE | {"Where", "Cast", "Identity", "Dropout"}


@dataclass
class Head:
    q: list[int]  # Q channels of its projection, in the order the head's dot product pairs them
    k: list[int]
    v: list[int]  # V channels, in the order of the head's output features
    out: list[int]  # rows of the output projection, same order as v


@dataclass
class Attention:
    name: str
    q: Layer
    k: Layer
    v: Layer
    out: Layer
    heads: list[Head]
    head_dim: int
    # filled when a head count is chosen: how every shape-carrying node changes
    tensors: dict = field(default_factory=dict)  # path tensor -> HeadLayout
    nodes: list = field(default_factory=list)  # path and score nodes
    shape_dims: dict = field(default_factory=dict, repr=False)  # every tensor's dims, free dims fixed

    @property
    def projections(self) -> list[Layer]:
        return list({id(p.node): p for p in (self.q, self.k, self.v)}.values())


def concrete_dims(model: onnx.ModelProto, measure: tuple = ()) -> dict[str, list[int]]:
    """Every tensor's dims from shape inference with the graph inputs' free dims fixed (the first
    to 2, the others to 1, as random verification inputs are), so that shapes computed from Shape
    ops become numbers. Operands of elementwise ops that inference leaves open (a mask built by
    Expand from the inputs), and the tensors in ``measure`` that inference leaves open, are
    measured by running the model once in onnxruntime."""
    sk = skeleton(model)
    weights = {t.name for t in model.graph.initializer}
    for value in sk.graph.input:
        if value.name in weights:
            continue
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                d.dim_value = 2 if axis == 0 else 1
    inferred = onnx.shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    dims = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            dims[v.name] = [d.dim_value for d in t.shape.dim]
    for t in model.graph.initializer:
        dims[t.name] = list(t.dims)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    missing = list(dict.fromkeys(i for n in model.graph.node if n.op_type in ELEMENTWISE | {"Where"}
                                 for i in n.input if i and i not in dims and types.get(i)))
    missing += [n for n in measure if n not in dims and types.get(n) and n not in missing]
    if missing and any(n.op_type == "Softmax" for n in model.graph.node):
        dims.update(_measured_dims(model, missing, types))
    return dims


def _measured_dims(model: onnx.ModelProto, names: list[str], types: dict) -> dict[str, list[int]]:
    from .runtime import make_session, random_inputs

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in names)
    try:
        session = make_session(probe.SerializeToString())
        values = session.run(names, random_inputs(session, batch=2))
    except Exception:  # a model onnxruntime cannot run on random inputs: the shapes stay unknown
        return {}
    return {n: list(v.shape) for n, v in zip(names, values)}


def _label(node) -> str:
    return node if isinstance(node, str) else f"{node.op_type} {node.name or node.output[0]!r}"


class Finder:
    """Attention layers of one graph."""

    def __init__(self, index: GraphIndex, dims: dict[str, list[int]]):
        self.index, self.dims = index, dims
        self.ids: dict[str, tuple[str, np.ndarray]] = {}  # tensor -> (id space, ids)

    # -- shapes and constants -------------------------------------------------------------
    def shape(self, name: str) -> list[int]:
        if name not in self.dims:
            raise Rejected(f"the shape of {name!r} is not known")
        return self.dims[name]

    def const(self, name: str) -> np.ndarray | None:
        return self.index.array(name) if name and self.index.is_weight(name) else None

    def data_input(self, node: onnx.NodeProto, scores: bool = False) -> str:
        """The input of an elementwise node that carries the full output shape (with ``scores``,
        the one that comes from a product of two tensors: a full-size mask is not it)."""
        full = [i for i in node.input if i and not self.index.is_weight(i) and self.dims.get(i) == self.dims.get(
            node.output[0])]
        if node.op_type in ("Where",):
            full = [i for i in node.input[1:] if i in full]
        if scores and len(full) > 1:
            full = [i for i in full if self._from_product(i)]
        if len(full) != 1:
            raise Rejected(f"{_label(node)} has no single full-shape data input")
        return full[0]

    def _from_product(self, tensor: str) -> bool:
        """Whether ``tensor`` is computed from a product of two tensors through score ops (not a
        mask or bias; a path that no single data input leads up is not)."""
        node = self.index.producer.get(tensor)
        try:
            while node is not None and node.op_type in SCORE_OPS:
                node = self.index.producer.get(self.data_input(node, scores=True))
        except Rejected:
            return False
        return node is not None and node.op_type == "MatMul" and not any(self.index.is_weight(i) for i in node.input)

    # -- walking --------------------------------------------------------------------------
    def projection(self, tensor: str) -> tuple[Layer, list[onnx.NodeProto]]:
        """The linear layer a core input comes from, and the layout nodes on the way (in order)."""
        path = []
        while True:
            node = self.index.producer.get(tensor)
            if node is None:
                raise Rejected(f"{tensor!r} does not come from a linear layer")
            layer = self._layer_ending_at(node, tensor)
            if layer is not None:
                return layer, path[::-1]
            if node.op_type not in LAYOUT | ELEMENTWISE:
                raise Rejected(f"{_label(node)} lies between a projection and the attention product")
            path.append(node)
            tensor = node.input[0] if node.op_type in LAYOUT else self.data_input(node)

    def _layer_ending_at(self, node: onnx.NodeProto, tensor: str) -> Layer | None:
        candidates = [node]
        if node.op_type == "Add":
            candidates = [self.index.producer.get(i) for i in node.input if i in self.index.producer]
        for cand in candidates:
            if cand is None or cand.op_type not in ("MatMul", "Gemm") or not self.index.is_weight(cand.input[1]):
                continue
            layer = describe_layer(self.index, cand)
            if layer.output == tensor:
                return layer
            raise Rejected(f"{_label(cand)}'s output reaches the attention without its bias")
        return None

    def ids_of(self, tensor: str, stop: dict[str, str]) -> tuple[str, np.ndarray]:
        """Element ids of ``tensor``: (the id space, ids); ``stop`` maps the tensors where id
        spaces start (projection outputs, the attention product) to their space's name."""
        if tensor in self.ids:
            return self.ids[tensor]
        if tensor in stop:
            dims = self.shape(tensor)
            result = (stop[tensor], np.arange(int(np.prod(dims)), dtype=np.int64).reshape(dims))
        else:
            node = self.index.producer[tensor]
            src = node.input[0] if node.op_type in LAYOUT else self.data_input(node)
            space, ids = self.ids_of(src, stop)
            result = (space, self.apply(node, tensor, ids))
        self.ids[tensor] = result
        return result

    def apply(self, node: onnx.NodeProto, output: str, ids: np.ndarray) -> np.ndarray:
        """What a layout node does to an array of ids."""
        op, out_dims = node.op_type, self.shape(output)
        if op == "Transpose":
            result = np.transpose(ids, attr(node, "perm") or None)
        elif op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            result = ids.reshape(out_dims)
        elif op == "Split":
            axis = int(attr(node, "axis", 0)) % ids.ndim
            sizes = [self.shape(o)[axis] for o in node.output]
            start = sum(sizes[:list(node.output).index(output)])
            result = np.take(ids, range(start, start + out_dims[axis]), axis=axis)
        elif op == "Slice":
            starts, ends = self.const(node.input[1]), self.const(node.input[2])
            axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
            steps = self.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(len(starts), int)
            if starts is None or ends is None or axes is None or steps is None:
                raise Rejected(f"{_label(node)} slices with computed bounds")
            index = [slice(None)] * ids.ndim
            for s, e, a, st in zip(starts, ends, axes, steps):
                index[int(a) % ids.ndim] = slice(int(s), int(min(e, 2 ** 62)) if e > 0 else int(e), int(st))
            result = ids[tuple(index)]
        elif op == "Gather":
            where = self.const(node.input[1])
            if where is None:
                raise Rejected(f"{_label(node)} gathers computed indices")
            result = np.take(ids, where, axis=int(attr(node, "axis", 0)))
        else:  # elementwise, Identity, Cast, Dropout
            result = ids
        if list(result.shape) != out_dims:
            raise Rejected(f"{_label(node)}: its layout could not be followed ({list(result.shape)} vs {out_dims})")
        return result

    # -- one attention layer ----------------------------------------------------------------
    def core(self, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.NodeProto]]:
        """(Q @ K^T, P @ V, the nodes between them) around a Softmax."""
        rank = len(self.shape(softmax.output[0]))
        if int(attr(softmax, "axis", -1)) % rank != rank - 1:
            raise Rejected(f"{_label(softmax)} normalises axis {attr(softmax, 'axis')}, not the keys")
        score_nodes = [softmax]
        tensor = softmax.input[0]
        while (node := self.index.producer.get(tensor)) is not None and node.op_type in SCORE_OPS:
            score_nodes.append(node)
            tensor = self.data_input(node, scores=True)
        if node is None or node.op_type != "MatMul" or any(self.index.is_weight(i) for i in node.input):
            raise Rejected(f"{_label(softmax)}'s scores do not come from a product of two tensors")
        qk = node
        tensor = softmax.output[0]
        while True:
            readers = [r for r in self.index.readers.get(tensor, []) if r is GRAPH_OUTPUT or r.op_type != "IsNaN"]
            guards = [r for r in self.index.readers.get(tensor, []) if r is not GRAPH_OUTPUT and r.op_type == "IsNaN"]
            if len(readers) != 1 or readers[0] is GRAPH_OUTPUT:
                raise Rejected(f"the attention weights {tensor!r} are read by {len(readers)} nodes")
            node = readers[0]
            for g in guards:  # Where(IsNaN(p), 0, p): the guard scaled_dot_product_attention exports
                if self.index.readers.get(g.output[0]) != [node] or node.op_type != "Where":
                    raise Rejected(f"{_label(g)} guards something else")
                score_nodes.append(g)
            if node.op_type == "MatMul":
                break
            if node.op_type not in SCORE_OPS:
                raise Rejected(f"the attention weights reach {_label(node)}")
            if self.data_input(node) != tensor:
                raise Rejected(f"{_label(node)} reads the attention weights as a parameter")
            score_nodes.append(node)
            tensor = node.output[0]
        if node.input[0] != tensor:
            raise Rejected(f"{_label(node)} multiplies the attention weights from the right")
        return qk, node, score_nodes

    def output_projection(self, pv: onnx.NodeProto) -> tuple[Layer, list[onnx.NodeProto]]:
        tensor, path = pv.output[0], []
        while True:
            readers = [r for r in self.index.readers.get(tensor, []) if r is GRAPH_OUTPUT or r.op_type != "Shape"]
            if len(readers) != 1 or readers[0] is GRAPH_OUTPUT:
                raise Rejected(f"the attention output {tensor!r} is read by {len(readers)} nodes")
            node = readers[0]
            if node.op_type in ("MatMul", "Gemm") and self.index.is_weight(node.input[1]) and node.input[0] == tensor:
                return describe_layer(self.index, node), path
            if node.op_type not in LAYOUT | ELEMENTWISE or (node.op_type in LAYOUT and node.input[0] != tensor):
                raise Rejected(f"the attention output reaches {_label(node)}")
            if node.op_type in ELEMENTWISE and self.data_input(node) != tensor:
                raise Rejected(f"{_label(node)} reads the attention output as a parameter")
            if len([o for o in node.output if o]) != 1:
                raise Rejected(f"{_label(node)} splits the attention output")
            path.append(node)
            tensor = node.output[0]

    def find(self, softmax: onnx.NodeProto) -> Attention:
        qk, pv, score_nodes = self.core(softmax)
        (q, q_path), (k, k_path), (v, v_path) = (self.projection(t) for t in (qk.input[0], qk.input[1], pv.input[1]))
        out, out_path = self.output_projection(pv)
        spaces = {p.output: p.name for p in (q, k, v)}
        self.ids = {}
        (sq, a), (sk, b), (sv, c) = (self.ids_of(t, spaces) for t in (qk.input[0], qk.input[1], pv.input[1]))
        layers = {p.name: p for p in (q, k, v)}
        channels = {name: int(self.index.initializers[p.weight].dims[p.out_axis]) for name, p in layers.items()}
        if not (a.shape[:-2] == b.shape[:-2] == c.shape[:-2]) or a.ndim < 3:
            raise Rejected(f"{_label(qk)} and {_label(pv)} do not share their batch axes")
        cq = _rows(a % channels[sq], along=-2, what="queries")
        ck = _rows(np.swapaxes(b, -1, -2) % channels[sk], along=-2, what="keys")
        cv = _rows(c % channels[sv], along=-2, what="values")
        groups = {}
        for beta in range(len(cq)):
            groups.setdefault((tuple(cq[beta]), tuple(ck[beta]), tuple(cv[beta])), []).append(beta)
        keys = list(groups)
        for i, which in enumerate(("Q", "K", "V")):
            sets = [frozenset(key[i]) for key in keys]
            if len(set(sets)) != len(sets) or sum(map(len, sets)) != len(frozenset().union(*sets)):
                raise Rejected(f"the {which} channels of the heads overlap")
        head_of_beta = np.empty(len(cq), dtype=np.int64)
        for h, key in enumerate(keys):
            head_of_beta[groups[key]] = h
        # the attention output: its ids name (batch index, query, feature)
        o_dims = self.shape(pv.output[0])
        saved, self.ids = self.ids, {}
        _, x = self.ids_of(out.node.input[0], {pv.output[0]: "out"})
        out_ids, self.ids = self.ids, saved
        beta, feature = np.unravel_index(x, (len(cq), int(np.prod(o_dims[-2:-1])), o_dims[-1]))[0::2]
        head_x = _rows(np.moveaxis(head_of_beta[beta], -1, 0).reshape(x.shape[-1], -1).T, along=0, what="outputs")
        feat_x = _rows(np.moveaxis(feature, -1, 0).reshape(x.shape[-1], -1).T, along=0, what="outputs")
        rows_in = int(self.index.initializers[out.weight].dims[out.in_axis])
        if rows_in != x.shape[-1]:
            raise Rejected(f"output projection {out.name!r} reads {rows_in} features, the heads give {x.shape[-1]}")
        heads = []
        for h, key in enumerate(keys):
            rows = [int(r) for r in np.flatnonzero(head_x[0] == h)]
            order = np.argsort(feat_x[0][rows])
            if sorted(feat_x[0][rows]) != list(range(len(key[2]))):
                raise Rejected(f"head {h}'s outputs do not reach {out.name!r} once each")
            heads.append(Head(q=list(key[0]), k=list(key[1]), v=list(key[2]), out=[rows[i] for i in order]))
        if len(heads) < 2:
            raise Rejected("a single head")
        if len({len(h.v) for h in heads}) != 1 or any(len(h.out) != len(h.v) for h in heads):
            raise Rejected("heads of unequal width")
        att = Attention(name=softmax.name or softmax.output[0], q=q, k=k, v=v, out=out, heads=heads,
                        head_dim=len(heads[0].v))
        att.shape_dims = self.dims
        att.nodes = list({id(n): n for n in q_path + k_path + v_path + score_nodes + [qk, pv] + out_path}.values())
        self._head_axes(att, {**self.ids, **out_ids}, head_of_beta, qk)
        self._check_readers(att)
        return att

    def _head_axes(self, att: Attention, ids: dict, head_of_beta: np.ndarray, qk: onnx.NodeProto) -> None:
        """For every tensor on the paths: its dims and the one axis along which heads vary."""
        head_of = {}
        for p in att.projections:
            n = int(self.index.initializers[p.weight].dims[p.out_axis])
            label = np.full(n, -1, dtype=np.int64)
            for h, head in enumerate(att.heads):
                for part in ((head.q if p.node is att.q.node else []) + (head.k if p.node is att.k.node else []) +
                             (head.v if p.node is att.v.node else [])):
                    label[part] = h
            head_of[p.name] = label
        per_beta = int(np.prod(self.shape(qk.output[0])[-2:-1])) * att.head_dim  # (query, feature) per index
        for tensor, (space, arr) in ids.items():
            labels = (head_of_beta[arr // per_beta] if space == "out" else head_of[space][arr % len(head_of[space])])
            att.tensors[tensor] = _head_layout(labels, tensor)
        s = self.shape(qk.output[0])
        score = np.broadcast_to(head_of_beta.reshape(s[:-2] + [1, 1]), s)
        att.tensors[qk.output[0]] = _head_layout(score, qk.output[0])
        for node in att.nodes:
            if node.op_type in SCORE_OPS | {"Softmax", "IsNaN"} and node.output[0] not in att.tensors:
                if self.dims.get(node.output[0]) == s:
                    att.tensors[node.output[0]] = _head_layout(score, node.output[0])

    def _check_readers(self, att: Attention) -> None:
        inside = {id(n) for n in att.nodes} | {id(att.out.node)} | {id(att.out.bias_node)}
        for tensor in att.tensors:
            for r in self.index.readers.get(tensor, []):
                if r is GRAPH_OUTPUT:
                    raise Rejected(f"{tensor!r} is a graph output (a key/value cache?)")
                if id(r) not in inside and r.op_type != "Shape":
                    raise Rejected(f"{tensor!r} is also read by {_label(r)}")


def _rows(values: np.ndarray, along: int, what: str) -> np.ndarray:
    """values (..., R, F) -> (B, F) when constant along ``along`` (the tokens): one row of
    channels per batch index."""
    first = np.take(values, [0], axis=along)
    if not np.all(values == first):
        raise Rejected(f"the {what} mix tokens and channels")
    return np.squeeze(first, axis=along).reshape(-1, values.shape[-1])


@dataclass
class HeadLayout:
    """How a tensor on an attention path holds its heads."""

    dims: list[int]
    axis: int | None  # the one axis along which heads change (None: one head's tensor)
    labels: np.ndarray | None  # the head of each position along that axis


def _head_layout(labels: np.ndarray, tensor: str) -> HeadLayout:
    axes = [a for a in range(labels.ndim) if not np.all(labels == np.take(labels, [0], axis=a))]
    if len(axes) > 1:
        raise Rejected(f"heads vary along several axes of {tensor!r}")
    if not axes:
        return HeadLayout(list(labels.shape), None, None)
    along = labels[tuple(slice(None) if a == axes[0] else 0 for a in range(labels.ndim))]
    return HeadLayout(list(labels.shape), axes[0], along)


def find_attention(index: GraphIndex) -> tuple[list[Attention], list[tuple[str, str]]]:
    """Attention layers whose heads can be removed, and (softmax, reason) for the others."""
    softmaxes = [n for n in index.graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        return [], []
    try:
        dims = concrete_dims(index.model)
    except Exception as exc:  # inference fails on some foreign models
        return [], [(n.name or n.output[0], f"shape inference failed: {exc}") for n in softmaxes]
    found, skipped = [], []
    for node in softmaxes:
        try:
            found.append(Finder(index, dims).find(node))
        except Rejected as exc:
            skipped.append((node.name or node.output[0], str(exc)))
    return found, skipped
