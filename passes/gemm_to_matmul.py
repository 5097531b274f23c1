"""Turn a Gemm between two Reshapes that only fold the leading axes into a MatMul on the
original tensor.

    x (N, T, C) -> Reshape (N*T, C) -> Gemm(W, b) -> Reshape (N, T, C')
becomes
    x (N, T, C) -> MatMul(W) -> Add(b)                         (N, T, C')

GPT-2's Conv1D (and any ``addmm`` on a flattened sequence) exports so; the Reshapes hide the
layer from the channel analysis, which reads a MatMul's channels on the last axis. A Gemm acts
on every row alike, so the two forms are equal whenever the first Reshape only merges the
leading axes (its output is (prod(x.shape[:-1]), C)) and the second splits them back
(x.shape[:-1] + (C',)). Both are checked on the shapes inferred with the inputs' free dims
fixed, at two batch sizes.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_merge.attention import concrete_dims
from onnx_merge.graph import GraphIndex, attr, remove_at
from onnx_merge.shapes import skeleton

from .cleanup import remove_dead_nodes


def _match(index: GraphIndex, gemm: onnx.NodeProto, dims: list[dict]) -> tuple | None:
    """(first Reshape, second Reshape) when the Gemm sits between two axis-folding Reshapes."""
    if gemm.op_type != "Gemm" or attr(gemm, "transA", 0) or not index.is_weight(gemm.input[1]):
        return None
    if len(gemm.input) > 2 and gemm.input[2] and (not index.is_weight(gemm.input[2]) or index.size(
            gemm.input[2]) not in (1, index.shape(gemm.input[1])[0 if attr(gemm, "transB", 0) else 1])):
        return None  # a bias that varies over the rows
    first, second = index.producer.get(gemm.input[0]), index.sole_reader(gemm.output[0])
    if (first is None or first.op_type != "Reshape" or not isinstance(second, onnx.NodeProto)
            or second.op_type != "Reshape" or second.input[0] != gemm.output[0]
            or index.sole_reader(first.output[0]) is not gemm):
        return None
    for d in dims:
        x, flat, out, y = (d.get(n) for n in (first.input[0], first.output[0], gemm.output[0], second.output[0]))
        if x is None or flat is None or out is None or y is None or len(x) < 3:
            return None
        if flat != [int(np.prod(x[:-1])), x[-1]] or y != x[:-1] + [out[-1]]:
            return None
    return first, second


def _batch_dims(model: onnx.ModelProto, batch: int) -> dict:
    """concrete_dims with the free leading dims of the inputs set to ``batch``."""
    probe = skeleton(model)  # shapes need no weights: no copy of them
    weights = {t.name for t in model.graph.initializer}
    for value in probe.graph.input:
        dim = value.type.tensor_type.shape.dim
        if value.name not in weights and dim and not dim[0].HasField("dim_value"):
            dim[0].dim_value = batch
    return concrete_dims(probe)


class GemmToMatMul:
    name = "gemm-to-matmul"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        if not any(n.op_type == "Gemm" for n in model.graph.node):
            return False
        index = GraphIndex(model)
        try:
            dims = [_batch_dims(model, 2), _batch_dims(model, 3)]
        except Exception:  # shape inference fails on some foreign models: leave them as they are
            return False
        matches = [(n, m) for n in model.graph.node if (m := _match(index, n, dims)) is not None]
        for gemm, (first, second) in matches:
            self._rewrite(model, index, gemm, first, second)
        if matches:
            remove_dead_nodes(model)
            replaced = {n for g, _ in matches for n in g.input[1:] if n}
            read = {i for node in model.graph.node for i in node.input}
            remove_at(model.graph.initializer, [i for i, t in enumerate(model.graph.initializer)
                                                if t.name in replaced and t.name not in read])
            ctx.report.setdefault("gemm_to_matmul", []).extend(g.name for g, _ in matches)
        return bool(matches)

    @staticmethod
    def _rewrite(model, index: GraphIndex, gemm, first, second) -> None:
        w = index.array(gemm.input[1])
        alpha, beta = float(attr(gemm, "alpha", 1.0)), float(attr(gemm, "beta", 1.0))
        weight = gemm.input[1]
        if attr(gemm, "transB", 0) or alpha != 1.0:
            weight = index.unique_name(f"{gemm.input[1]}_matmul")
            index.add_initializer(weight, ((w.T if attr(gemm, "transB", 0) else w) * w.dtype.type(alpha)).astype(w.dtype))
        name = gemm.name or gemm.output[0]
        nodes = []
        if len(gemm.input) > 2 and gemm.input[2]:
            b = index.array(gemm.input[2])
            bias = index.unique_name(f"{gemm.input[2]}_add")
            index.add_initializer(bias, (b.reshape(-1) * b.dtype.type(beta)).astype(b.dtype))
            product = index.unique_name(f"{name}_product")
            nodes.append(onnx.helper.make_node("MatMul", [first.input[0], weight], [product], name=name))
            nodes.append(onnx.helper.make_node("Add", [product, bias], [second.output[0]], name=f"{name}_bias"))
        else:
            nodes.append(onnx.helper.make_node("MatMul", [first.input[0], weight], [second.output[0]], name=name))
        at = list(model.graph.node).index(second)
        model.graph.node.remove(second)
        for i, node in enumerate(nodes):
            model.graph.node.insert(at + i, node)
