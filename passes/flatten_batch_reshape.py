"""Turn the batch-keeping reshape that ``x.view(x.size(0), -1)`` exports to into a Flatten.

    Shape(x) -> Gather(0) -> Unsqueeze(0) -> Concat(., [-1]) -> Reshape(x, .)
                                                  becomes        Flatten(x, axis=1)

(also with Slice(Shape(x), 0, 1), Gather(Shape(x), [0]) or Shape(x, start=0, end=1) for the
batch dimension). Both compute (N, -1). The TorchScript exporter writes the first form for
every classifier head of this kind; there the Shape node reads x as well, so x's channels
looked coupled to it and the last conv before the head was never compressed.
"""

from __future__ import annotations

import onnx

from onnx_merge.graph import GraphIndex, attr

from .cleanup import remove_dead_nodes


def _constant(index: GraphIndex, name: str) -> list | None:
    return index.array(name).reshape(-1).tolist() if name and index.is_weight(name) else None


def _whole_shape_of(index: GraphIndex, name: str) -> str | None:
    """x when ``name`` is Shape(x) with no start or end."""
    node = index.producer.get(name)
    if node is None or node.op_type != "Shape" or attr(node, "start", 0) != 0 or attr(node, "end") is not None:
        return None
    return node.input[0]


def _gathered_dim0(index: GraphIndex, node: onnx.NodeProto | None, ndim: int) -> str | None:
    """x when ``node`` is Gather(Shape(x), 0) with an index of rank ``ndim``."""
    if node is None or node.op_type != "Gather" or attr(node, "axis", 0) != 0 or not index.is_weight(node.input[1]):
        return None
    where = index.array(node.input[1])
    return _whole_shape_of(index, node.input[0]) if where.ndim == ndim and where.reshape(-1).tolist() == [0] else None


def batch_dim_of(index: GraphIndex, name: str) -> str | None:
    """x when ``name`` is the 1-element tensor [x.shape[0]], else None."""
    node = index.producer.get(name)
    if node is None:
        return None
    op = node.op_type
    if op == "Shape" and attr(node, "start", 0) == 0 and attr(node, "end") == 1:
        return node.input[0]
    if op == "Unsqueeze":  # of a scalar Gather(Shape(x), 0)
        axes = attr(node, "axes") or _constant(index, node.input[1] if len(node.input) > 1 else "")
        gather = index.producer.get(node.input[0])
        return _gathered_dim0(index, gather, ndim=0) if list(axes or []) == [0] else None
    if op == "Gather":
        return _gathered_dim0(index, node, ndim=1)
    if op == "Slice":
        starts, ends = (_constant(index, node.input[i]) if len(node.input) > i else None for i in (1, 2))
        axes = _constant(index, node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
        steps = _constant(index, node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
        if starts != [0] or ends != [1] or axes != [0] or steps != [1]:
            return None
        return _whole_shape_of(index, node.input[0])
    return None


def flattens_batch(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether a Reshape's shape is Concat([x.shape[0]], [-1]) of its own input x."""
    if node.op_type != "Reshape" or len(node.input) < 2:
        return False
    concat = index.producer.get(node.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or attr(concat, "axis") != 0:
        return False
    return batch_dim_of(index, concat.input[0]) == node.input[0] and _constant(index, concat.input[1]) == [-1]


class FlattenBatchReshape:
    name = "flatten-batch-reshape"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        index = GraphIndex(model)
        matches = [n for n in model.graph.node if flattens_batch(index, n)]
        for node in matches:
            data = node.input[0]
            node.op_type = "Flatten"
            del node.input[:]
            node.input.append(data)
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", 1))
        if matches:
            remove_dead_nodes(model)
        return bool(matches)
