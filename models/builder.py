"""A small helper to write ONNX graphs from NumPy weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10  # deliberate: onnx 1.23 defaults to IR 14, which onnxruntime 1.31 refuses


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, shape=None, dtype=TensorProto.FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, output: str | None = None, **attrs) -> str:
        name = name or self.fresh(op)
        out = output or f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, name: str, w: np.ndarray, b: np.ndarray | None = None, **attrs) -> str:
        inputs = [x, self.const(f"{name}.weight", w)] + ([self.const(f"{name}.bias", b)] if b is not None else [])
        k = w.shape[2]
        attrs.setdefault("pads", [k // 2] * 4)
        attrs.setdefault("kernel_shape", list(w.shape[2:]))
        return self.node("Conv", inputs, name=name, **attrs)

    def bn(self, x: str, name: str, gamma, beta, mean, var, eps: float = 1e-5) -> str:
        names = [self.const(f"{name}.{k}", v) for k, v in
                 (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var))]
        return self.node("BatchNormalization", [x] + names, name=name, epsilon=eps)

    def gemm(self, x: str, name: str, w: np.ndarray, b: np.ndarray | None = None) -> str:
        inputs = [x, self.const(f"{name}.weight", w)] + ([self.const(f"{name}.bias", b)] if b is not None else [])
        return self.node("Gemm", inputs, name=name, transB=1)

    def relu(self, x: str, name: str | None = None) -> str:
        return self.node("Relu", [x], name=name)

    def build(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name="onnx-merge-models")
        onnx.checker.check_model(model)
        return model


def fold_bn(w: np.ndarray, b: np.ndarray | None, gamma, beta, mean, var, eps: float = 1e-5):
    """Conv weights and bias with a following BatchNormalization folded in."""
    k = gamma / np.sqrt(var + eps)
    b = np.zeros_like(mean) if b is None else b
    return (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32), (beta + k * (b - mean)).astype(np.float32)
