"""Channel analysis: which producer channels can be removed, and what reads them.

A *free chain* is one producer layer whose output channels are read by exactly one path

    producer (Conv | Gemm | MatMul[+Add]) -> [BatchNormalization] -> per-channel ops -> consumer

where every op on the path acts on each channel on its own (activations, pools, Dropout,
Flatten with the channel leading, ...) and the consumer (Conv | ConvTranspose | Gemm |
MatMul) contracts over those channels. Anything else that reads a channel (a residual Add,
a Concat, a second consumer, a graph output) makes the channels coupled: the candidate is
rejected with that reason. Merging is allowed only when every op on the path is positively
homogeneous (METHOD.md sections 4 and 5); otherwise the chain can only be pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import GRAPH_OUTPUT, GraphIndex, attr
from .shapes import TensorDims

# Per-channel ops that commute with a non-negative per-channel scale.
HOMOGENEOUS_ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu"}
TRANSPARENT = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Dropout", "Identity", "Pad",
               "Resize", "Upsample", "Flatten", "Reshape"}
# Per-channel but not positively homogeneous: pruning is fine, merging is not exact.
OTHER_ACTIVATIONS = {"Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Gelu",
                     "Mish", "Clip", "Celu", "ThresholdedRelu", "Erf", "Abs", "Neg", "Exp", "Sqrt"}
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Pad", "Resize", "Upsample"}
# Over spatial axes only, each acts per channel and commutes with a merge scale (x.mean((2, 3)) in torch).
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"}
LAYERS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}
QUANTIZED_LAYERS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@dataclass
class Layer:
    """A linear layer as the chain sees it."""

    node: onnx.NodeProto
    weight: str
    out_axis: int  # axis of the weight that indexes output channels
    in_axis: int  # axis of the weight that indexes input channels
    bias: str | None = None
    bias_node: onnx.NodeProto | None = None  # the Add of a MatMul+Add pair
    output: str = ""  # the tensor after the bias
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


@dataclass
class Chain:
    producer: Layer
    consumer: Layer
    channels: int
    bn: onnx.NodeProto | None = None
    path: list[onnx.NodeProto] = field(default_factory=list)  # ops between producer (or BN) and consumer
    block: int = 1  # consumer input features per channel (> 1 after a Flatten)
    # After a Flatten of a channel-last layout (a MatMul's output, or a Transpose moving the
    # channel last) channel c owns features c, c + N, c + 2N, ... instead of a contiguous block.
    interleaved: bool = False
    mergeable: bool = True
    why_not_merge: str = ""

    @property
    def name(self) -> str:
        return self.producer.name

    @property
    def tensors(self) -> list[str]:
        """Every tensor whose channel count changes."""
        names = [self.producer.node.output[0], self.producer.output]
        if self.bn is not None:
            names.append(self.bn.output[0])
        names += [n.output[0] for n in self.path]
        return list(dict.fromkeys(names))

    def match_names(self) -> list[str]:
        """Names a --layer-ratio / --exclude glob may match."""
        return [n for n in (self.producer.node.name, self.producer.weight, self.producer.output) if n]


@dataclass
class Skip:
    node: str
    reason: str


class Rejected(Exception):
    """A candidate is not a free chain; the message is the user-facing reason."""


def _label(node) -> str:
    return node if isinstance(node, str) else f"{node.op_type} {node.name or node.output[0]!r}"


def _own_weight(index: GraphIndex, name: str, node: onnx.NodeProto, what: str) -> str:
    if not name or not index.is_weight(name):
        source = index.producer.get(name)
        if isinstance(source, onnx.NodeProto) and source.op_type == "DequantizeLinear":
            raise Rejected(f"{what} {name!r} is dequantized (a quantized model): compress the float model, "
                           "then quantize it")
        raise Rejected(f"{what} {name!r} is not a constant initializer")
    others = index.shared_with(name, node)
    if others:
        raise Rejected(f"{what} {name!r} is shared with {', '.join(others)}")
    return name


def describe_layer(index: GraphIndex, node: onnx.NodeProto) -> Layer:
    """The weight layout of a Conv/Gemm/MatMul/ConvTranspose node, or Rejected."""
    op = node.op_type
    if len(node.input) < 2:
        raise Rejected(f"{op} has no weight input")
    weight = _own_weight(index, node.input[1], node, "weight")
    shape = index.initializers[weight].dims
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    layer = Layer(node=node, weight=weight, out_axis=0, in_axis=1, output=node.output[0])
    if op == "Conv":
        layer.out_axis, layer.in_axis = 0, 1
    elif op == "ConvTranspose":
        layer.out_axis, layer.in_axis = 1, 0
    elif op == "Gemm":
        if attr(node, "transA", 0):
            raise Rejected("Gemm with transA=1 is not supported")
        trans_b = attr(node, "transB", 0)
        layer.out_axis, layer.in_axis = (0, 1) if trans_b else (1, 0)
        layer.alpha, layer.beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    elif op == "MatMul":
        if len(shape) != 2:
            raise Rejected(f"MatMul weight {weight!r} is {len(shape)}-D, not 2-D")
        layer.out_axis, layer.in_axis = 1, 0
        add = index.sole_reader(node.output[0])
        if add is not GRAPH_OUTPUT and add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if index.is_weight(other) and not index.shared_with(other, add):
                if int(np.prod(index.initializers[other].dims)) == shape[1]:
                    bias, layer.bias_node, layer.output = other, add, add.output[0]
    else:
        raise Rejected(f"{op} is not a linear layer")
    if bias is not None:
        owner = layer.bias_node or node
        layer.bias = _own_weight(index, bias, owner, "bias")
    return layer


def _groups(node: onnx.NodeProto) -> int:
    return int(attr(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1


def _layer_channels(index: GraphIndex, layer: Layer, role: str) -> int:
    dims = index.initializers[layer.weight].dims
    axis = layer.out_axis if role == "out" else layer.in_axis
    return int(dims[axis])


def reduction_axes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """The axes a Reduce* node reduces (attribute before opset 18, constant input after);
    None when they are computed or empty (empty means every axis)."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = index.array(node.input[1]).tolist() if index.is_weight(node.input[1]) else None
    return list(axes) if axes else None


def nonnegative_axes(axes: list[int], rank: int | None) -> list[int] | None:
    """Axes with negative ones counted from ``rank``; None when that is needed and unknown."""
    if any(a < 0 for a in axes) and rank is None:
        return None
    return [a + rank if a < 0 else a for a in axes]


def _check_path_op(index: GraphIndex, node: onnx.NodeProto, channel_last: bool, flattened: bool,
                   rank: int | None) -> None:
    op = node.op_type
    if op in SPATIAL and channel_last or op in SPATIAL | REDUCE and flattened:
        raise Rejected(f"{_label(node)} pools over a layout whose channel axis is not axis 1")
    if op in REDUCE:
        axes = reduction_axes(index, node)
        axes = None if axes is None else nonnegative_axes(axes, rank)
        if channel_last:  # NHWC: the spatial axes lie between the batch and the last axis, so the rank is needed
            first, stop = 1, rank - 1 if rank is not None else 1
        else:  # NCHW: every axis after batch and channel
            first, stop = 2, None
        if axes is None or any(a < first or stop is not None and a >= stop for a in axes):
            raise Rejected(f"{_label(node)} reduces over axes that are not provably spatial")
    if op == "Flatten" and int(attr(node, "axis", 1)) != 1:
        raise Rejected(f"{_label(node)} flattens at axis {attr(node, 'axis')} (channel block layout unknown)")
    if op == "Reshape":
        shape_name = node.input[1] if len(node.input) > 1 else ""
        if not index.is_weight(shape_name):
            raise Rejected(f"{_label(node)} has a computed shape")
        shape = index.array(shape_name)
        if len(shape) != 2:
            raise Rejected(f"{_label(node)} reshapes to rank {len(shape)}; only (batch, features) is provable")
    if op == "Pad":
        mode = attr(node, "mode", "constant")
        pads = attr(node, "pads")
        value = attr(node, "value", 0.0)
        if pads is None and len(node.input) > 1 and index.is_weight(node.input[1]):
            pads = index.array(node.input[1]).tolist()
        if len(node.input) > 2 and node.input[2]:
            value = float(index.array(node.input[2])) if index.is_weight(node.input[2]) else None
        if len(node.input) > 3 and node.input[3]:
            raise Rejected(f"{_label(node)} pads selected axes only")
        if mode != "constant" or value != 0.0 or pads is None:
            raise Rejected(f"{_label(node)} is not a zero constant pad")
        rank = len(pads) // 2
        if rank < 2 or pads[1] != 0 or pads[1 + rank] != 0:
            raise Rejected(f"{_label(node)} pads the channel axis")
    if op == "Dropout" and len(node.output) > 1 and node.output[1] and index.readers.get(node.output[1]):
        raise Rejected(f"{_label(node)} exposes its mask")


def _check_prelu_slope(index: GraphIndex, node: onnx.NodeProto, channels: int, channel_last: bool,
                       flattened: bool, rank: int | None) -> None:
    """A per-channel slope is sliced with the producer: it must be laid out per channel, before
    any Flatten, and this node's alone."""
    slope = node.input[1]
    shape = list(index.initializers[slope].dims)
    axis = None if flattened else channel_param_axis(shape, channel_last, rank)
    if axis is None or shape[axis] != channels:
        raise Rejected(f"{_label(node)} has slopes of shape {shape}, not one per channel of {channels}")
    if index.shared_with(slope, node):
        raise Rejected(f"{_label(node)} shares its slope {slope!r} with other nodes")


def _check_transpose(node: onnx.NodeProto, channel_last: bool, flattened: bool) -> None:
    """Only a Transpose that keeps the batch first and moves the channel axis (1) last is
    followed, as TF-style NHWC heads do before a Flatten."""
    perm = list(attr(node, "perm") or [])
    if channel_last or flattened or len(perm) < 3 or perm[0] != 0 or perm[-1] != 1:
        raise Rejected(f"{_label(node)} permutes axes {perm or 'in reverse'}: only moving the channel last is followed")


def activation_kind(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """'homogeneous', 'per-channel' (a PRelu with a slope per channel), 'other', or None when
    the node is no activation."""
    if node.op_type in HOMOGENEOUS_ACTIVATIONS:
        if node.op_type == "PRelu":
            slope = node.input[1]
            if not index.is_weight(slope):
                raise Rejected(f"{_label(node)} takes a computed slope")
            if index.array(slope).size != 1:
                return "per-channel"
        return "homogeneous"
    if _is_relu_clip(index, node) or _is_relu_max(index, node):
        return "homogeneous"
    if node.op_type in OTHER_ACTIVATIONS:
        return "other"
    return None


def _is_relu_max(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Max(x, 0): the torch dynamo exporter's torch.clamp(x, min=0)."""
    if node.op_type != "Max" or len(node.input) != 2:
        return False
    const = [i for i in node.input if index.is_weight(i)]
    return len(const) == 1 and index.array(const[0]).size == 1 and float(index.array(const[0]).reshape(-1)[0]) == 0.0


def _is_relu_clip(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Clip(min=0) with no upper bound (torch.clamp(x, min=0)) is a ReLU; ReLU6 is not homogeneous."""
    if node.op_type != "Clip":
        return False
    if len(node.input) > 1:  # opset 11+: bounds are inputs
        bounds = [node.input[i] if i < len(node.input) else "" for i in (1, 2)]
        if any(b and not index.is_weight(b) for b in bounds):
            return False
        low = float(index.array(bounds[0]).reshape(-1)[0]) if bounds[0] else -np.inf
        high = float(index.array(bounds[1]).reshape(-1)[0]) if bounds[1] else np.inf
    else:
        low, high = float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))
    return low == 0.0 and high >= float(np.finfo(np.float32).max)


def channel_param_axis(shape, channel_last: bool, rank: int | None) -> int | None:
    """The axis of a broadcast parameter (a PRelu slope, a Mul's scale) that meets the data's
    channel axis, or None when it is unknown or the parameter also varies along another axis.
    Broadcasting aligns from the right, so channel axis 1 of rank-r data falls on parameter
    axis len(shape) - r + 1; a last channel axis on the parameter's last."""
    shape = list(shape)
    if channel_last:
        axis = len(shape) - 1
    elif rank is None:
        return None
    else:
        axis = len(shape) - rank + 1
    if axis < 0 or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return axis


def _bn_after(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The inference-mode BatchNormalization that alone reads ``tensor``, if any."""
    node = index.sole_reader(tensor)
    if not isinstance(node, onnx.NodeProto) or node.op_type != "BatchNormalization" or node.input[0] != tensor:
        return None
    if any(o for o in node.output[1:]) or attr(node, "training_mode", 0):
        raise Rejected(f"{_label(node)} runs in training mode")
    for name in node.input[1:5]:
        _own_weight(index, name, node, "BatchNormalization parameter")
    return node


def trace_chain(index: GraphIndex, node: onnx.NodeProto, dims: TensorDims | None = None) -> Chain:
    """Follow a producer's channels to their consumer, or raise Rejected with the reason.
    ``dims`` (shape inference, run on first use) gives a rank the layers do not fix."""
    if _groups(node) != 1:
        raise Rejected(f"grouped conv (group={_groups(node)}): its output channels are tied by group")
    if node.op_type == "ConvTranspose":
        raise Rejected("ConvTranspose producers are not supported")
    producer = describe_layer(index, node)
    channels = _layer_channels(index, producer, "out")
    channel_last = node.op_type == "MatMul"
    # The output's rank where the layer fixes it (a Conv: its weight's; a Gemm: 2). It resolves
    # negative reduction axes and tells which axis a MatMul consumer contracts.
    rank = {"Conv": len(index.initializers[producer.weight].dims), "Gemm": 2}.get(node.op_type)
    tensor = producer.output
    path, flattened, interleaved = [], False, False
    mergeable, why = True, ""
    bn = _bn_after(index, tensor)
    if bn is not None:
        tensor = bn.output[0]
    while True:
        readers = index.readers.get(tensor, [])
        if len(readers) != 1:
            names = ", ".join(_label(r) for r in readers) or "nothing"
            raise Rejected(f"channels of {tensor!r} are read by {len(readers)} nodes ({names}): coupled, left whole")
        nxt = readers[0]
        if nxt is GRAPH_OUTPUT:
            raise Rejected(f"channels of {tensor!r} are a graph output")
        if nxt.input[0] != tensor and not _is_relu_max(index, nxt):
            others = [i for i in nxt.input if i and i != tensor and not index.is_weight(i)]
            if others:
                raise Rejected(f"channels of {tensor!r} meet {', '.join(map(repr, others))} at {_label(nxt)}: "
                               "coupled, left whole")
            raise Rejected(f"{_label(nxt)} reads {tensor!r} as a parameter, not as data")
        if nxt.op_type in LAYERS:
            break
        if nxt.op_type == "BatchNormalization":  # after the activation: per channel, but affine
            _bn_after(index, tensor)
            if mergeable:
                mergeable, why = False, f"{_label(nxt)} follows the activation (affine: prune only)"
            path.append(nxt)
            tensor = nxt.output[0]
            continue
        if nxt.op_type == "Transpose":
            _check_transpose(nxt, channel_last, flattened)
            channel_last = True
            path.append(nxt)
            tensor = nxt.output[0]
            continue
        kind = activation_kind(index, nxt)
        if kind is None and nxt.op_type not in TRANSPARENT | REDUCE:
            raise Rejected(f"channels of {tensor!r} reach {_label(nxt)}, which mixes or couples channels")
        if kind == "per-channel":
            _check_prelu_slope(index, nxt, channels, channel_last, flattened, rank)
            if mergeable:
                mergeable, why = False, f"{_label(nxt)} has a slope per channel: a merge would mix them (prune only)"
        if kind == "other" and mergeable:
            mergeable, why = False, f"{_label(nxt)} is not positively homogeneous (prune only)"
        if kind is None:  # activations are elementwise: any layout will do
            if rank is None and nxt.op_type in REDUCE and dims is not None:  # e.g. a MatMul's (N, T, C)
                rank = dims.rank(tensor)
            _check_path_op(index, nxt, channel_last, flattened, rank)
            if nxt.op_type in ("Flatten", "Reshape"):
                interleaved |= channel_last and not flattened
                flattened = True
            if nxt.op_type in REDUCE and not attr(nxt, "keepdims", 1):
                rank -= len(reduction_axes(index, nxt))
        path.append(nxt)
        tensor = nxt.output[0]
    if nxt.op_type == "MatMul" and nxt.input[1] == tensor:
        raise Rejected(f"{_label(nxt)} reads the channels as its right operand")
    # The consumer must contract the axis that holds the channels: a MatMul contracts the last,
    # a Conv axis 1. A dimension that merely has the same size is no evidence.
    if nxt.op_type == "MatMul" and not (channel_last or flattened) and rank != 2:
        raise Rejected(f"consumer {_label(nxt)} contracts the last axis; the channels are on axis 1")
    if nxt.op_type in ("Conv", "ConvTranspose") and channel_last and not flattened:
        raise Rejected(f"consumer {_label(nxt)} reads axis 1; the channels are on the last axis")
    if _groups(nxt) != 1:
        raise Rejected(f"consumer {_label(nxt)} is a grouped/depthwise conv: its channels are coupled")
    try:
        consumer = describe_layer(index, nxt)
    except Rejected as exc:
        raise Rejected(f"consumer {_label(nxt)}: {exc}") from None
    features = _layer_channels(index, consumer, "in")
    if flattened:
        if features % channels:
            raise Rejected(f"consumer {_label(nxt)} has {features} inputs, not a multiple of {channels} channels")
        block = features // channels
    else:
        if features != channels:
            raise Rejected(f"consumer {_label(nxt)} reads {features} channels, producer writes {channels}")
        block = 1
    return Chain(producer=producer, consumer=consumer, channels=channels, bn=bn, path=path, block=block,
                 interleaved=interleaved and block > 1, mergeable=mergeable, why_not_merge=why)


def find_chains(index: GraphIndex) -> tuple[list[Chain], list[Skip]]:
    """All free chains in the main graph, and a reason for every layer that is not one."""
    chains, skips = [], []
    dims = TensorDims(index.model)
    for node in index.graph.node:
        name = node.name or node.output[0]
        if node.op_type in QUANTIZED_LAYERS:
            skips.append(Skip(name, f"{node.op_type} is a quantized layer: compress the float model, then quantize it"))
        if node.op_type not in LAYERS:
            continue
        try:
            chains.append(trace_chain(index, node, dims))
        except Rejected as exc:
            skips.append(Skip(name, str(exc)))
    return chains, skips
