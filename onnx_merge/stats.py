"""Parameter and MAC counts, from initializers and inferred shapes."""

from __future__ import annotations

import numpy as np
import onnx

from .ops import LAYER, rule
from .shapes import inferred_dims


def count_parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.BFLOAT16)))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {name: [d or 1 for d in dims] for name, dims in inferred_dims(model).items()}


def count_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of the op table's layers (Conv, ConvTranspose, Gemm, MatMul) for
    batch 1 (unknown dims as 1), each by its rule's formula.

    None when shape inference fails (some foreign models).
    """
    per_node = node_macs(model)
    return None if per_node is None else sum(per_node.values())


def node_macs(model: onnx.ModelProto) -> dict[str, int] | None:
    """count_macs per layer, keyed by node name (or first output where unnamed); None when
    shape inference fails."""
    try:
        shapes = _shapes(model)
    except Exception:  # shape inference fails on some foreign models; MACs are then unknown
        return None
    macs = {}
    for node in model.graph.node:
        r = rule(node.op_type)
        if r.kind != LAYER:
            continue
        out = shapes.get(node.output[0]) if node.output else None
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or w is None or not w:
            continue
        total = r.macs(node, out, w, shapes.get(node.input[0]))
        if total:
            key = node.name or node.output[0]
            macs[key] = macs.get(key, 0) + total
    return macs
