"""Parameter and MAC counts, from initializers and inferred shapes."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import attr
from .shapes import inferred_dims


def count_parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.BFLOAT16)))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {name: [d or 1 for d in dims] for name, dims in inferred_dims(model).items()}


def count_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for batch 1 (unknown dims as 1).

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
        out = shapes.get(node.output[0]) if node.output else None
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or w is None:
            continue
        total = None
        if node.op_type == "Conv":
            total = int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x = shapes.get(node.input[0])
            if x:
                total = int(np.prod(x[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm" and len(w) == 2:  # a malformed weight counts nothing
            k = w[1] if attr(node, "transB", 0) else w[0]
            total = int(np.prod(out)) * k
        elif node.op_type == "MatMul" and len(w) >= 1:
            total = int(np.prod(out)) * w[-2 if len(w) > 1 else 0]
        if total is not None:
            key = node.name or node.output[0]
            macs[key] = macs.get(key, 0) + total
    return macs
