"""Keeping shape annotations honest after a rewrite."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import remove_at


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values, from its shape (reading raw_data would copy it)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return tensor.ByteSize()
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def drop_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove value_info entries of tensors whose shapes changed (they would be stale)."""
    remove_at(model.graph.value_info, [i for i, v in enumerate(model.graph.value_info) if v.name in names])


def skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """The model with large initializers turned into graph inputs of the same shape.

    Shape inference needs their shapes, not their values; this keeps it cheap on big models.
    """
    listed = {i.name for i in model.graph.input}
    small = [t for t in model.graph.initializer if tensor_nbytes(t) <= keep_bytes]
    large = [t for t in model.graph.initializer if tensor_nbytes(t) > keep_bytes and t.name not in listed]
    dropped = {t.name for t in model.graph.initializer if tensor_nbytes(t) > keep_bytes and t.name in listed}
    small += [t for t in model.graph.initializer if t.name in dropped]  # already inputs: keep as they were
    graph = onnx.helper.make_graph(
        model.graph.node, model.graph.name,
        list(model.graph.input) + [onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in large],
        model.graph.output, small, value_info=model.graph.value_info)
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def inferred_dims(model: onnx.ModelProto, infer: bool = True) -> dict[str, list[int | None]]:
    """Tensor name -> dims from shape inference (None where a dim is not a known number);
    tensors whose rank is unknown are absent. With ``infer`` False, only what the file lists."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False, data_prop=True) if infer else model
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


class TensorDims:
    """Tensor dims from shape inference, computed once on first use."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self._dims = model, None

    def get(self, tensor: str) -> list[int | None] | None:
        if self._dims is None:
            try:
                self._dims = inferred_dims(self.model)
            except Exception:  # foreign models can defeat inference: use what the file lists
                self._dims = inferred_dims(self.model, infer=False)
        return self._dims.get(tensor)

    def rank(self, tensor: str) -> int | None:
        dims = self.get(tensor)
        return None if dims is None else len(dims)

    def channels(self, tensor: str) -> int | None:
        dims = self.get(tensor)
        return dims[1] if dims is not None and len(dims) > 1 else None
