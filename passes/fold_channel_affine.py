"""Fold a per-channel constant Mul, Div, Add or Sub into the Conv or Gemm before it, and a
per-channel Mul or Div into the Conv or Gemm after it.

    Conv(x, W, b) -> Mul(s) -> Add(t)      becomes      Conv(x, W * s, b * s + t)
    Relu -> Mul(s) -> Conv(W)              becomes      Relu -> Conv(W * s over input channels)

Some converters write a layer's bias as a separate Add, or a BatchNormalization as Mul and Add
(Keras with fused=False, Caffe's Scale layer), before or after the activation. Left in place,
these hide the chain. Exact whenever the node alone reads the layer's output (or alone feeds
the layer) and the constant varies along the channel axis only; zero padding of a scaled input
is the scaled zero, so a Conv consumer's pads do not matter.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_merge.graph import GraphIndex, attr
from onnx_merge.groups import channel_param_axis
from onnx_merge.ops import along, weight_axes
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
    channels = w.shape[weight_axes(layer)[0]]
    values = _per_channel(index.array(const), w, layer.op_type, channels, node.op_type == "Div")
    if values is None or _bias_per_channel(index, layer, channels) is None or (
            layer.op_type == "Gemm" and float(attr(layer, "beta", 1.0)) == 0):
        return None  # not per channel; a bias that varies over the batch, or one the Gemm ignores
    return layer, values


def _match_consumer(index: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """(the consumer, its per-input-channel scale) for a Mul/Div whose output feeds a Conv or Gemm alone."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    consumer = index.sole_reader(node.output[0])
    if not isinstance(consumer, onnx.NodeProto) or consumer.op_type not in ("Conv", "Gemm"):
        return None
    if consumer.input[0] != node.output[0] or int(attr(consumer, "group", 1)) != 1 or attr(consumer, "transA", 0):
        return None
    data = [i for i in node.input if not index.is_weight(i)]
    const = [i for i in node.input if index.is_weight(i)]
    if len(data) != 1 or len(const) != 1 or (node.op_type == "Div" and node.input[1] != const[0]):
        return None
    if index.shared_with(const[0], node) or not index.is_weight(consumer.input[1]) or index.shared_with(
            consumer.input[1], consumer):
        return None
    w = index.array(consumer.input[1])
    channels = w.shape[weight_axes(consumer)[1]]
    scale = _per_channel(index.array(const[0]), w, consumer.op_type, channels, node.op_type == "Div")
    if scale is None:
        return None
    return consumer, scale if node.op_type == "Mul" else 1.0 / scale


def _per_channel(values: np.ndarray, w: np.ndarray, op: str, channels: int, divisor: bool) -> np.ndarray | None:
    """A constant as one float64 value per channel of the layer's data (axis 1 of a Conv's, the
    last of a Gemm's), or None when it broadcasts along anything else or divides by zero."""
    rank = w.ndim if op == "Conv" else 2
    if values.dtype != w.dtype or values.ndim > rank:  # a longer shape would broadcast the output up
        return None
    if values.size > 1:
        axis = channel_param_axis(values.shape, op == "Gemm", rank)
        if axis is None or values.shape[axis] != channels:
            return None
    if divisor and np.any(values == 0):
        return None
    return np.broadcast_to(values.reshape(-1).astype(np.float64), (channels,))


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
        while (name := self._fold_next(model)) is not None:
            folded.append(name)
        if folded:
            ctx.report.setdefault("folded_affine", []).extend(folded)
        return bool(folded)

    def _fold_next(self, model: onnx.ModelProto) -> str | None:
        """Fold the first node that matches; its name, or None when none does."""
        index = GraphIndex(model)
        for node in model.graph.node:
            if (found := _match_consumer(index, node)) is not None:
                consumer, scale = found
                self._scale_inputs(index, consumer, scale)
                consumer.input[0] = next(i for i in node.input if not index.is_weight(i))
                stale = node.output[0]
            elif (found := _match(index, node)) is not None:
                layer, values = found
                self._fold(index, node, layer, values)
                stale = layer.output[0]
                layer.output[0] = node.output[0]  # the layer takes over the node's output tensor
            else:
                continue
            drop_value_info(model, {stale})
            model.graph.node.remove(node)
            return node.name
        return None

    @staticmethod
    def _scale_inputs(index: GraphIndex, consumer: onnx.NodeProto, scale: np.ndarray) -> None:
        w = index.array(consumer.input[1])
        index.set_array(consumer.input[1], (w * along(scale, weight_axes(consumer)[1], w.ndim)).astype(w.dtype))

    @staticmethod
    def _fold(index: GraphIndex, node: onnx.NodeProto, layer: onnx.NodeProto, values: np.ndarray) -> None:
        w = index.array(layer.input[1])
        beta = float(attr(layer, "beta", 1.0)) if layer.op_type == "Gemm" else 1.0
        bias = _bias_per_channel(index, layer, len(values)) * beta  # the bias as it reaches the output
        if node.op_type in ("Mul", "Div"):
            scale = values if node.op_type == "Mul" else 1.0 / values
            index.set_array(layer.input[1], (w * along(scale, weight_axes(layer)[0], w.ndim)).astype(w.dtype))
            bias = bias * scale
        else:
            bias = bias + (values if node.op_type == "Add" else -values)
        new_bias = (bias / beta).astype(w.dtype)
        if len(layer.input) > 2 and layer.input[2]:
            index.set_array(layer.input[2], new_bias)
        else:
            index.attach_bias(layer, new_bias)
