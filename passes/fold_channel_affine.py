"""Fold a per-channel constant Mul, Div, Add or Sub into the Conv or Gemm before it.

    Conv(x, W, b) -> Mul(s) -> Add(t)      becomes      Conv(x, W * s, b * s + t)

Some converters write a layer's bias as a separate Add, or a BatchNormalization as Mul and Add
(Keras with fused=False, Caffe's Scale layer). Left in place, these sit between the layer and
its activation and hide the chain. Exact whenever the layer's output is read by that node
alone and the constant varies along the channel axis only.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_merge.graph import GraphIndex, attr
from onnx_merge.groups import channel_param_axis
from onnx_merge.shapes import drop_value_info

OPS = {"Mul", "Div", "Add", "Sub"}


def _match(index: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """(the layer, the constant as one value per output channel), or None."""
    if node.op_type not in OPS or len(node.input) != 2:
        return None
    layer = index.producer.get(node.input[0]) or index.producer.get(node.input[1])
    if layer is None or layer.op_type not in ("Conv", "Gemm") or index.sole_reader(layer.output[0]) is not node:
        return None
    const = node.input[1] if node.input[0] == layer.output[0] else node.input[0]
    if const == layer.output[0] or not index.is_weight(const):
        return None
    if node.op_type in ("Sub", "Div") and node.input[0] != layer.output[0]:  # t - y and s / y are not affine in y
        return None
    if layer.op_type == "Gemm" and attr(layer, "transA", 0):
        return None
    if index.shared_with(const, node) or any(not index.is_weight(n) or index.shared_with(n, layer)
                                             for n in layer.input[1:3] if n):
        return None
    w = index.array(layer.input[1])
    channels = w.shape[0] if layer.op_type == "Conv" or attr(layer, "transB", 0) else w.shape[1]
    rank = w.ndim if layer.op_type == "Conv" else 2
    values = index.array(const)
    if values.dtype != w.dtype or values.ndim > rank:  # a longer shape would broadcast the output up
        return None
    if values.size == 1:
        return layer, np.full(channels, values.reshape(-1)[0])
    axis = channel_param_axis(values.shape, layer.op_type == "Gemm", rank)
    if axis is None or values.shape[axis] != channels:
        return None
    if node.op_type == "Div" and np.any(values == 0):
        return None
    return layer, values.reshape(-1)


def _bias_per_channel(index: GraphIndex, layer: onnx.NodeProto, channels: int) -> np.ndarray | None:
    """The bias as (channels,), zeros when absent; None when a Gemm's C varies over the batch."""
    if len(layer.input) < 3 or not layer.input[2]:
        return np.zeros(channels)
    c = index.array(layer.input[2])
    if c.size != 1 and c.shape not in ((channels,), (1, channels)):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))


class FoldChannelAffine:
    name = "fold-channel-affine"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        folded = []
        while True:
            index = GraphIndex(model)
            found = next(((n, m) for n in model.graph.node if (m := _match(index, n)) is not None), None)
            if found is None:
                break
            node, (layer, values) = found
            if not self._fold(index, node, layer, values.astype(np.float64)):
                break
            stale = layer.output[0]
            layer.output[0] = node.output[0]  # the layer takes over the node's output tensor
            drop_value_info(model, {stale})
            model.graph.node.remove(node)
            folded.append(node.name)
        if folded:
            ctx.report.setdefault("folded_affine", []).extend(folded)
        return bool(folded)

    @staticmethod
    def _fold(index: GraphIndex, node: onnx.NodeProto, layer: onnx.NodeProto, values: np.ndarray) -> bool:
        w = index.array(layer.input[1])
        rows_first = layer.op_type == "Conv" or attr(layer, "transB", 0)
        channels = len(values)
        bias = _bias_per_channel(index, layer, channels)
        beta = float(attr(layer, "beta", 1.0)) if layer.op_type == "Gemm" else 1.0
        if bias is None or beta == 0.0:
            return False
        bias = bias * beta  # the bias as it reaches the output
        if node.op_type in ("Mul", "Div"):
            scale = values if node.op_type == "Mul" else 1.0 / values
            shape = (-1,) + (1,) * (w.ndim - 1) if rows_first else (1, -1)
            index.set_array(layer.input[1], (w * scale.reshape(shape)).astype(w.dtype))
            bias = bias * scale
        else:
            bias = bias + (values if node.op_type == "Add" else -values)
        new_bias = (bias / beta).astype(w.dtype)
        if len(layer.input) > 2 and layer.input[2]:
            index.set_array(layer.input[2], new_bias)
        else:
            name = index.unique_name(layer.input[1] + "_bias")
            index.add_initializer(name, new_bias)
            if len(layer.input) == 2:
                layer.input.append(name)
            else:
                layer.input[2] = name
        return True
