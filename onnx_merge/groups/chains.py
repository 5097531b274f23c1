"""Channel analysis: which producer channels can be removed, and what reads them.

A *free chain* is one producer layer whose output channels reach their readers only through
ops that act on each channel on its own (the op table, ``onnx_merge.ops``):

    producer (Conv | Gemm | MatMul[+Add]) -> [BatchNormalization] -> per-channel ops -> consumer(s)

Per-channel ops include composite units (SiLU written as ``x * Sigmoid(x)``, GELU's erf form,
...), pools, Dropout, Flatten with the channel leading. A *fan-out* (several readers, each
reaching a linear consumer through per-channel ops) is one chain with several consumers: a
merge applies the same compensation to each. Anything else that reads a channel (a residual
Add, a Concat, a graph output) makes the channels coupled: the candidate is declined with that
reason (``spaces`` groups those). Merging is allowed only when every op on the path
is positively homogeneous (METHOD.md sections 4 and 5); otherwise the chain can only be pruned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import GRAPH_OUTPUT, GraphIndex, attr
from ..ops import (BLOCKER, ELEMENTWISE, LAYER, PER_CHANNEL, REDUCE, RESHAPE, Activation, Decline, activation_of,
                  conv_groups, match_unit, rule)
from ..shapes import TensorDims

Rejected = Decline  # the name the passes used before the op table


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
    # every consumer, with its own layout; a fan-out has several, branches[0] is ``consumer``
    branches: list["Branch"] = field(default_factory=list)
    activation: tuple[str, dict] | None = None  # the path's one activation (name, parameters), None if none/several

    @property
    def name(self) -> str:
        return self.producer.name

    @property
    def consumers(self) -> list[Layer]:
        return [b.consumer for b in self.branches] or [self.consumer]

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
class Branch:
    """One consumer of a chain and how it sees the channels."""

    consumer: Layer
    block: int = 1  # consumer input features per channel (> 1 after a Flatten)
    interleaved: bool = False


@dataclass
class Skip:
    node: str
    reason: str


def _label(node) -> str:
    return node if isinstance(node, str) else f"{node.op_type} {node.name or node.output[0]!r}"


def _own_weight(index: GraphIndex, name: str, node: onnx.NodeProto, what: str) -> str:
    if not name or not index.is_weight(name):
        source = index.producer.get(name)
        if isinstance(source, onnx.NodeProto) and source.op_type == "DequantizeLinear":
            raise Decline(f"{what} {name!r} is dequantized (a quantized model): compress the float model, "
                           "then quantize it")
        raise Decline(f"{what} {name!r} is not a constant initializer")
    others = index.shared_with(name, node)
    if others:
        raise Decline(f"{what} {name!r} is shared with {', '.join(others)}")
    return name


def describe_layer(index: GraphIndex, node: onnx.NodeProto) -> Layer:
    """The weight layout of a Conv/Gemm/MatMul/ConvTranspose node, or Decline."""
    op = node.op_type
    if len(node.input) < 2:
        raise Decline(f"{op} has no weight input")
    weight = _own_weight(index, node.input[1], node, "weight")
    shape = index.initializers[weight].dims
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if rule(op).kind != LAYER:
        raise Decline(f"{op} is not a linear layer")
    out_axis, in_axis = rule(op).axes(node)
    if len(shape) <= max(out_axis, in_axis) or (op in ("Conv", "ConvTranspose") and len(shape) < 3):
        raise Decline(f"{op} weight {weight!r} has shape {list(shape)}, which is not a {op} weight layout")
    layer = Layer(node=node, weight=weight, out_axis=out_axis, in_axis=in_axis, output=node.output[0])
    if op == "Gemm":
        if attr(node, "transA", 0):
            raise Decline("Gemm with transA=1 is not supported")
        layer.alpha, layer.beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    elif op == "MatMul":
        if len(shape) != 2:
            raise Decline(f"MatMul weight {weight!r} is {len(shape)}-D, not 2-D")
        add = index.sole_reader(node.output[0])
        if add is not GRAPH_OUTPUT and add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if index.is_weight(other) and not index.shared_with(other, add):
                if int(np.prod(index.initializers[other].dims)) == shape[1]:
                    bias, layer.bias_node, layer.output = other, add, add.output[0]
    if bias is not None:
        owner = layer.bias_node or node
        layer.bias = _own_weight(index, bias, owner, "bias")
    return layer


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
    op, r = node.op_type, rule(node.op_type)
    if r.spatial and channel_last or (r.spatial or r.kind == REDUCE) and flattened:
        raise Decline(f"{_label(node)} pools over a layout whose channel axis is not axis 1")
    if r.kind == REDUCE:
        axes = reduction_axes(index, node)
        axes = None if axes is None else nonnegative_axes(axes, rank)
        if channel_last:  # NHWC: the spatial axes lie between the batch and the last axis, so the rank is needed
            first, stop = 1, rank - 1 if rank is not None else 1
        else:  # NCHW: every axis after batch and channel
            first, stop = 2, None
        if axes is None or any(a < first or stop is not None and a >= stop for a in axes):
            raise Decline(f"{_label(node)} reduces over axes that are not provably spatial")
    if op == "Flatten" and int(attr(node, "axis", 1)) != 1:
        raise Decline(f"{_label(node)} flattens at axis {attr(node, 'axis')} (channel block layout unknown)")
    if op == "Reshape":
        shape_name = node.input[1] if len(node.input) > 1 else ""
        if not index.is_weight(shape_name):
            raise Decline(f"{_label(node)} has a computed shape")
        shape = index.array(shape_name)
        if len(shape) != 2:
            raise Decline(f"{_label(node)} reshapes to rank {len(shape)}; only (batch, features) is provable")
    if op == "Pad":
        mode = attr(node, "mode", "constant")
        pads = attr(node, "pads")
        value = attr(node, "value", 0.0)
        if pads is None and len(node.input) > 1 and index.is_weight(node.input[1]):
            pads = index.array(node.input[1]).tolist()
        if len(node.input) > 2 and node.input[2]:
            value = float(index.array(node.input[2])) if index.is_weight(node.input[2]) else None
        if len(node.input) > 3 and node.input[3]:
            raise Decline(f"{_label(node)} pads selected axes only")
        if mode != "constant" or value != 0.0 or pads is None:
            raise Decline(f"{_label(node)} is not a zero constant pad")
        rank = len(pads) // 2
        if rank < 2 or pads[1] != 0 or pads[1 + rank] != 0:
            raise Decline(f"{_label(node)} pads the channel axis")
    if op == "Dropout" and len(node.output) > 1 and node.output[1] and index.readers.get(node.output[1]):
        raise Decline(f"{_label(node)} exposes its mask")


def _check_prelu_slope(index: GraphIndex, node: onnx.NodeProto, channels: int, channel_last: bool,
                       flattened: bool, rank: int | None) -> None:
    """A per-channel slope is sliced with the producer: it must be laid out per channel, before
    any Flatten, and this node's alone."""
    slope = node.input[1]
    shape = list(index.initializers[slope].dims)
    axis = None if flattened else channel_param_axis(shape, channel_last, rank)
    if axis is None or shape[axis] != channels:
        raise Decline(f"{_label(node)} has slopes of shape {shape}, not one per channel of {channels}")
    if index.shared_with(slope, node):
        raise Decline(f"{_label(node)} shares its slope {slope!r} with other nodes")


def _check_transpose(node: onnx.NodeProto, channel_last: bool, flattened: bool) -> None:
    """Only a Transpose that keeps the batch first and moves the channel axis (1) last is
    followed, as TF-style NHWC heads do before a Flatten."""
    perm = list(attr(node, "perm") or [])
    if channel_last or flattened or len(perm) < 3 or perm[0] != 0 or perm[-1] != 1:
        raise Decline(f"{_label(node)} permutes axes {perm or 'in reverse'}: only moving the channel last is followed")


def activation_kind(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """'homogeneous', 'per-channel' (a PRelu with a slope per channel), 'other', or None when
    the node is no activation."""
    act = activation_of(index, node)
    if act is None:
        return None
    if node.op_type == "PRelu":
        if not index.is_weight(node.input[1]):
            raise Decline(f"{_label(node)} takes a computed slope")
        if index.size(node.input[1]) != 1:
            return "per-channel"
    return "homogeneous" if act.homogeneous else "other"


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
        raise Decline(f"{_label(node)} runs in training mode")
    for name in node.input[1:5]:
        _own_weight(index, name, node, "BatchNormalization parameter")
    return node


@dataclass
class _Layout:
    """Where a walk along the channels finds them."""

    channel_last: bool  # on the last axis (a MatMul's output, after a Transpose), not axis 1
    rank: int | None  # of the tensor, where the layers fix it
    flattened: bool = False
    interleaved: bool = False


class _Walk:
    """Follows a producer's channels to every consumer; Decline says why they are not free."""

    def __init__(self, index: GraphIndex, dims: TensorDims | None, channels: int):
        self.index, self.dims, self.channels = index, dims, channels
        self.path: list[onnx.NodeProto] = []
        self.branches: list[Branch] = []
        self.activations: list[Activation] = []
        self.mergeable, self.why = True, ""
        self.opaque = False  # something besides one activation shapes the channels (no `activation` then)

    def not_mergeable(self, why: str) -> None:
        if self.mergeable:
            self.mergeable, self.why = False, why

    def follow(self, tensor: str, layout: _Layout) -> None:
        index = self.index
        while tensor is not None:
            readers = index.readers.get(tensor, [])
            if not readers:
                raise Decline(f"channels of {tensor!r} are read by nothing")
            if GRAPH_OUTPUT in readers:
                raise Decline(f"channels of {tensor!r} are a graph output")
            if len(readers) > 1 or rule(readers[0].op_type).kind == ELEMENTWISE:
                unit = match_unit(index, tensor)
                if unit is not None:
                    self.path += unit.nodes
                    self._activation(unit.activation, f"{_label(unit.nodes[-1])} (with {len(unit.nodes) - 1} more "
                                     "nodes, one per-channel unit)")
                    tensor = unit.output
                    continue
            if len(readers) > 1:  # a fan-out: every reader must reach a consumer on its own
                for reader in readers:
                    branch = copy.copy(layout)
                    self.follow(self._step(tensor, reader, branch), branch)
                return
            tensor = self._step(tensor, readers[0], layout)

    def _activation(self, act: Activation, label: str) -> None:
        if act.name != "identity":
            self.activations.append(act)
        if not act.homogeneous:
            self.not_mergeable(f"{label} is not positively homogeneous (prune only)")

    def _step(self, tensor: str, nxt: onnx.NodeProto, layout: _Layout) -> str | None:
        """Take ``nxt`` onto the path; its output, or None when it is a consumer."""
        index = self.index
        if nxt.input[0] != tensor:
            others = [i for i in nxt.input if i and i != tensor and not index.is_weight(i)]
            if others:
                raise Decline(f"channels of {tensor!r} meet {', '.join(map(repr, others))} at {_label(nxt)}: "
                              "coupled, left whole")
            raise Decline(f"{_label(nxt)} reads {tensor!r} as a parameter, not as data")
        r = rule(nxt.op_type)
        if r.kind == LAYER:
            self.branches.append(self._consumer(tensor, nxt, layout))
            return None
        if nxt.op_type == "BatchNormalization":  # after the activation: per channel, but affine
            _bn_after(index, tensor)
            self.not_mergeable(f"{_label(nxt)} follows the activation (affine: prune only)")
            self.opaque = True  # the activation is no longer the path's one function
        elif nxt.op_type == "Transpose":
            _check_transpose(nxt, layout.channel_last, layout.flattened)
            layout.channel_last = True
        elif (kind := activation_kind(index, nxt)) is not None:
            if kind == "per-channel":
                _check_prelu_slope(index, nxt, self.channels, layout.channel_last, layout.flattened, layout.rank)
                self.not_mergeable(f"{_label(nxt)} has a slope per channel: a merge would mix them (prune only)")
                self.opaque = True
            self._activation(activation_of(index, nxt), _label(nxt))
            _check_path_op(index, nxt, layout.channel_last, layout.flattened, layout.rank)  # Dropout's mask
        elif r.kind in (PER_CHANNEL, REDUCE, RESHAPE) and nxt.op_type not in ("InstanceNormalization",):
            if layout.rank is None and r.kind == REDUCE and self.dims is not None:  # e.g. a MatMul's (N, T, C)
                layout.rank = self.dims.rank(tensor)
            _check_path_op(index, nxt, layout.channel_last, layout.flattened, layout.rank)
            if nxt.op_type in ("Flatten", "Reshape"):
                layout.interleaved |= layout.channel_last and not layout.flattened
                layout.flattened = True
            if r.kind == REDUCE and not attr(nxt, "keepdims", 1):
                layout.rank -= len(reduction_axes(index, nxt))
        else:
            why = r.reason if r.kind == BLOCKER and r.reason else "mixes or couples channels"
            raise Decline(f"channels of {tensor!r} reach {_label(nxt)}, which {why}")
        self.path.append(nxt)
        return nxt.output[0]

    def _consumer(self, tensor: str, nxt: onnx.NodeProto, layout: _Layout) -> Branch:
        index = self.index
        if nxt.op_type == "MatMul" and nxt.input[1] == tensor:
            raise Decline(f"{_label(nxt)} reads the channels as its right operand")
        # The consumer must contract the axis that holds the channels: a MatMul contracts the last,
        # a Conv axis 1. A dimension that merely has the same size is no evidence.
        if nxt.op_type == "MatMul" and not (layout.channel_last or layout.flattened) and layout.rank != 2:
            raise Decline(f"consumer {_label(nxt)} contracts the last axis; the channels are on axis 1")
        if nxt.op_type in ("Conv", "ConvTranspose") and layout.channel_last and not layout.flattened:
            raise Decline(f"consumer {_label(nxt)} reads axis 1; the channels are on the last axis")
        if conv_groups(nxt) != 1:
            raise Decline(f"consumer {_label(nxt)} is a grouped/depthwise conv: pruned with its channel group")
        try:
            consumer = describe_layer(index, nxt)
        except Decline as exc:
            raise Decline(f"consumer {_label(nxt)}: {exc}") from None
        features = _layer_channels(index, consumer, "in")
        if layout.flattened:
            if features % self.channels:
                raise Decline(f"consumer {_label(nxt)} has {features} inputs, not a multiple of {self.channels} channels")
            block = features // self.channels
        else:
            if features != self.channels:
                raise Decline(f"consumer {_label(nxt)} reads {features} channels, producer writes {self.channels}")
            block = 1
        return Branch(consumer, block, layout.interleaved and block > 1)


def trace_chain(index: GraphIndex, node: onnx.NodeProto, dims: TensorDims | None = None) -> Chain:
    """Follow a producer's channels to their consumers, or raise Decline with the reason.
    ``dims`` (shape inference, run on first use) gives a rank the layers do not fix."""
    if conv_groups(node) != 1:
        raise Decline(f"grouped conv (group={conv_groups(node)}): its output channels are pruned with their channel group")
    if node.op_type == "ConvTranspose":
        raise Decline("ConvTranspose producers are not supported")
    producer = describe_layer(index, node)
    channels = _layer_channels(index, producer, "out")
    # The output's rank where the layer fixes it (a Conv: its weight's; a Gemm: 2). It resolves
    # negative reduction axes and tells which axis a MatMul consumer contracts.
    rank = {"Conv": len(index.initializers[producer.weight].dims), "Gemm": 2}.get(node.op_type)
    tensor = producer.output
    bn = _bn_after(index, tensor)
    if bn is not None:
        tensor = bn.output[0]
    walk = _Walk(index, dims, channels)
    walk.follow(tensor, _Layout(channel_last=node.op_type == "MatMul", rank=rank))
    first = walk.branches[0]
    acts = walk.activations
    activation = (acts[0].name, acts[0].params) if len(acts) == 1 and acts[0].name and not walk.opaque else None
    return Chain(producer=producer, consumer=first.consumer, channels=channels, bn=bn, path=walk.path,
                 block=first.block, interleaved=first.interleaved, mergeable=walk.mergeable,
                 why_not_merge=walk.why, branches=walk.branches, activation=activation)


def find_chains(index: GraphIndex) -> tuple[list[Chain], list[Skip]]:
    """All free chains in the main graph, and a reason for every layer that is not one."""
    chains, skips = [], []
    dims = TensorDims(index.model)
    for node in index.graph.node:
        name = node.name or node.output[0]
        r = rule(node.op_type)
        if r.kind == BLOCKER and "quantized" in r.reason:
            skips.append(Skip(name, f"{node.op_type} {r.reason}"))
        if r.kind != LAYER:
            continue
        try:
            chains.append(trace_chain(index, node, dims))
        except Decline as exc:
            skips.append(Skip(name, str(exc)))
    return chains, skips
