"""Parameter and MAC counts, from initializers and inferred shapes."""

from __future__ import annotations

import numpy as np
import onnx

from .ops import LAYER, rule
from .shapes import inferred_dims, skeleton


def count_parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.BFLOAT16)))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Dims for counting: shape inference's, and where it leaves a layer's feature map unsized
    (timm's tf_* nets pad by sizes computed at run time, which onnx's data propagation cannot
    follow: EfficientNetV2-B0 counted 42 M of its 718 M MACs at 224 x 224) those of one
    onnxruntime run. Unknown dims left after that count as 1 (a symbolic batch)."""
    dims = inferred_dims(model)
    unsized = _unsized_layer_tensors(model, dims)
    if unsized:
        dims.update(measured_dims(model, unsized))
    return {name: [d or 1 for d in ds] for name, ds in dims.items()}


def _unsized_layer_tensors(model: onnx.ModelProto, dims: dict) -> list[str]:
    """Layers' activations whose dims past the first (the batch) shape inference does not know."""
    weights = {t.name for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if rule(node.op_type).kind != LAYER:
            continue
        for t in (node.input[0] if node.input else "", node.input[1] if len(node.input) > 1 else "",
                  node.output[0] if node.output else ""):
            if t and t not in weights and (t not in dims or None in dims[t][1:]):
                names.append(t)
    return list(dict.fromkeys(names))


def measured_dims(model: onnx.ModelProto, tensors: list[str]) -> dict[str, list[int]]:
    """The dims of ``tensors`` in one onnxruntime run at batch 1 on zeros, the weights' values
    left out (zeros of their shapes: shape arithmetic reads only small constants, which stay).
    Empty when the inputs' other dims are not all known (a free sequence length: any choice
    would be a guess) or the run fails."""
    try:
        from .runtime import make_session
    except ImportError:
        return {}
    shell = skeleton(model)
    feeds = {}
    for value in shell.graph.input:
        tensor = value.type.tensor_type
        known = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
        if None in known[1:] or tensor.elem_type in (0, onnx.TensorProto.STRING):
            return {}
        shape = [1 if d is None else d for d in known]
        feeds[value.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    taps = [t for t in tensors if t not in {o.name for o in shell.graph.output}]
    shell.graph.output.extend(onnx.ValueInfoProto(name=t) for t in taps)
    try:
        session = make_session(shell.SerializeToString(), once=True)
        values = session.run(list(tensors), feeds)
    except Exception:  # onnxruntime's own errors, or a model that cannot run on zeros: the counts stay as inferred
        return {}
    return {t: list(v.shape) for t, v in zip(tensors, values)}


def count_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of the op table's layers (Conv, ConvTranspose, Gemm, MatMul) for
    batch 1 (dims shape inference cannot size measured by a run, _shapes), each by its rule's formula.

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
