"""Coupled channel groups: channel spaces tied together across several layers.

Union-find over tensors, keyed by their channel axis. Per-channel ops (BN, activations,
pools, Dropout, ...) and elementwise ops between feature maps (a residual Add, a gating
Mul) put their inputs and output in one space; a depthwise conv does too (its channel n
reads only input channel n). Layers write a space (producers) or read one (consumers).
A Concat or Split along the channel axis is an index map, not a union: each Concat input
owns a contiguous range of the output space (its *view*), each Split output a range of the
input space; pruning a space prunes the same ranges' members downstream (and a Split's
sizes). Slice and Pad over spatial axes act per channel. A space also read by something
whose channel mapping is not provable here (a channel Pad such as an option-A shortcut, a
channel Slice, Transpose, a graph input or output, a subgraph) is *blocked*, with the
reason; so is a space whose channels reach a blocked Concat output or Split output.

A group is every producer, consumer, depthwise conv and per-channel parameter of one
space; pruning it removes the same channel indices everywhere (DepGraph's idea, on ONNX).
Merging is not exact across a sum of several producers, so groups are only pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import GraphIndex, attr
from .chains import Layer, channel_param_axis, describe_layer, nonnegative_axes, reduction_axes
from ..ops import BLOCKER, ELEMENTWISE, LAYER, PER_CHANNEL, REDUCE, Decline, conv_groups, is_depthwise, rule
from ..shapes import TensorDims


def _spatial_reduction(index: GraphIndex, dims: TensorDims, node: onnx.NodeProto) -> bool:
    """A reduction over spatial axes only (never batch or channel)."""
    axes = reduction_axes(index, node)
    axes = nonnegative_axes(axes, dims.rank(node.input[0])) if axes else None
    return axes is not None and all(a >= 2 for a in axes)


def _flattening_reshape(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Reshape to (batch, features) with the channel leading in the features."""
    if len(node.input) < 2 or not index.is_weight(node.input[1]):
        return False
    shape = index.array(node.input[1]).tolist()
    return len(shape) == 2 and shape[1] != 0


@dataclass
class Group:
    root: str
    producers: list[Layer] = field(default_factory=list)
    consumers: list[Layer] = field(default_factory=list)
    depthwise: list[onnx.NodeProto] = field(default_factory=list)
    per_channel: list[tuple[onnx.NodeProto, str]] = field(default_factory=list)  # (node, parameter) to slice
    reshapes: list[onnx.NodeProto] = field(default_factory=list)  # flattening Reshapes spelling out features
    tensors: set[str] = field(default_factory=set)
    blocked: str = ""
    views: list[tuple["Group", int]] = field(default_factory=list)  # (Concat output space, input position)
    parts: list["Group"] = field(default_factory=list)  # for a Concat output space: its inputs, in order
    concat: onnx.NodeProto | None = None  # for a Concat output space: the Concat
    static_width: int | None = None  # channels of a space nothing here writes (a graph input)
    splits: list["SplitView"] = field(default_factory=list)  # Splits of this space along channels
    split_of: tuple["SplitView", int] | None = None  # for a Split output space: the Split, output position
    residual: list[onnx.NodeProto] = field(default_factory=list)  # Add/Sum/... joining feature maps here
    # for a Concat output space: layers that also write it (an SE gate's expand conv, a residual
    # addend), sliced with the ranges its parts keep
    driven: list[Layer] = field(default_factory=list)
    blocks: int = 1  # grouped convs read or write it: channels fall in this many equal blocks, pruned alike

    @property
    def coupled(self) -> bool:
        return len(self.producers) > 1 or bool(self.depthwise) or bool(self.views)

    @property
    def free(self) -> bool:
        """Compressed by default: no residual stream, here or in a space its channels reach."""
        return not self.residual and not any(target.residual for target, _ in reached_spaces(self))

    @property
    def kind(self) -> str:
        if self.residual:
            return "residual"
        if self.views or self.splits or self.parts or self.split_of:
            return "index map"
        if self.depthwise:
            return "depthwise"
        if self.blocks > 1:
            return "grouped"
        return "gated" if len(self.producers) > 1 else "fan-out" if len(self.consumers) > 1 else "chain"


@dataclass
class SplitView:
    node: onnx.NodeProto
    outputs: list[Group]
    sizes: list[int]


class _Spaces:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, t: str) -> str:
        self.parent.setdefault(t, t)
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def union(self, *names: str) -> None:
        roots = [self.find(n) for n in names]
        for r in roots[1:]:
            self.parent[r] = roots[0]


def _channel_concat(index: GraphIndex, dims: TensorDims, node: onnx.NodeProto) -> bool:
    """A Concat of feature maps along axis 1 (the channel axis)."""
    axis = nonnegative_axes([int(attr(node, "axis", 1))], dims.rank(node.output[0]))
    return axis == [1] and all(i and not index.is_weight(i) for i in node.input)


def _channel_split(index: GraphIndex, dims: TensorDims, node: onnx.NodeProto) -> list[int] | None:
    """The sizes of a Split along axis 1 (the channel axis), or None."""
    if nonnegative_axes([int(attr(node, "axis", 0))], dims.rank(node.input[0])) != [1] or not all(node.output):
        return None
    if len(node.input) > 1 and node.input[1]:
        sizes = index.array(node.input[1]).tolist() if index.is_weight(node.input[1]) else None
    elif attr(node, "split") is not None:
        sizes = list(attr(node, "split"))
    else:  # equal parts
        c, parts = dims.channels(node.input[0]), len(node.output)
        sizes = [c // parts] * parts if c and c % parts == 0 else None
    return [int(v) for v in sizes] if sizes and len(sizes) == len(node.output) else None


def _whole_channel_range(index: GraphIndex, dims: TensorDims, node: onnx.NodeProto, axes: list[int]) -> bool:
    """A Slice that keeps every channel (GhostNet's ``out[:, :out_chs]`` when the Concat is that wide):
    it then acts per channel, and its end still covers a pruned width."""
    if 1 not in axes or 0 in axes or len(node.input) < 3 or not all(index.is_weight(i) for i in node.input[1:3]):
        return False
    at = axes.index(1)
    start, end = int(index.array(node.input[1])[at]), int(index.array(node.input[2])[at])
    step = int(index.array(node.input[4])[at]) if len(node.input) > 4 and index.is_weight(node.input[4]) else 1
    width = dims.channels(node.input[0])
    return start == 0 and step == 1 and width is not None and end >= width


def _spatial_only(index: GraphIndex, dims: TensorDims, node: onnx.NodeProto) -> str:
    """'' when a Slice or Pad touches only axes from 2 on (it then acts per channel), else why not."""
    label = f"{node.op_type} {node.name!r}"
    if node.op_type == "Slice":
        axes = attr(node, "axes")
        if len(node.input) > 3 and node.input[3]:
            axes = index.array(node.input[3]).tolist() if index.is_weight(node.input[3]) else None
        elif len(node.input) > 1 and axes is None:  # opset 10+: no axes input means every axis
            axes = list(range(len(index.array(node.input[1])))) if index.is_weight(node.input[1]) else None
        axes = None if axes is None else nonnegative_axes(axes, dims.rank(node.input[0]))
        if axes is None:
            return f"{label} slices axes that are not known here"
        if all(a >= 2 for a in axes) or _whole_channel_range(index, dims, node, axes):
            return ""
        return f"{label} slices the channel axis"
    pads = attr(node, "pads")
    if pads is None and len(node.input) > 1 and index.is_weight(node.input[1]):
        pads = index.array(node.input[1]).tolist()
    if pads is None or (len(node.input) > 3 and node.input[3]):
        return f"{label} pads axes that are not known here"
    half = len(pads) // 2
    if half < 2 or pads[1] or pads[1 + half]:
        return (f"{label} pads the channel axis (as an option-A shortcut does): the padded channels belong to "
                "another space, a mapping not handled here")
    return ""


def _add_param(index: GraphIndex, dims: TensorDims, node: onnx.NodeProto, name: str, roles: list, block) -> None:
    """A parameter that varies per channel is sliced with them; one that varies along another
    axis (a (C,) scale on NCHW data broadcasts over the width) pins the space."""
    normalization = node.op_type in ("BatchNormalization", "InstanceNormalization")  # (C,) by definition
    if normalization or channel_param_axis(index.initializers[name].dims, False, dims.rank(node.output[0])) is not None:
        roles.append((node.output[0], "param", (node, name)))
    else:
        block(node.output[0], f"{node.op_type} {node.name!r} parameter {name!r} is not laid out per channel")


def find_groups(index: GraphIndex) -> list[Group]:
    spaces = _Spaces()
    blocked: dict[str, str] = {}
    roles: list[tuple[str, str, object]] = []  # (tensor, role, payload)
    concats: list[onnx.NodeProto] = []
    splits: list[tuple[onnx.NodeProto, list[int]]] = []
    sums: list[onnx.NodeProto] = []  # additive joins of feature maps: residual streams
    dims = TensorDims(index.model)

    def block(tensor: str, reason: str) -> None:
        blocked.setdefault(tensor, reason)

    for node in index.graph.node:
        op = node.op_type
        data = [i for i in node.input if i and not index.is_weight(i)]
        label = f"{op} {node.name!r}"
        r = rule(op)
        if r.kind == LAYER:
            if is_depthwise(index, node):
                spaces.union(node.input[0], node.output[0])
                roles.append((node.output[0], "depthwise", node))
                continue
            try:
                layer = describe_layer(index, node)
            except Decline as exc:
                for t in data + [node.output[0]]:
                    block(t, f"{label}: {exc}")
                continue
            if op == "ConvTranspose" and conv_groups(node) != 1:
                for t in data + [node.output[0]]:
                    block(t, f"{label} is a grouped transposed conv")
                continue
            if conv_groups(node) != 1:  # its input and output channels each fall in `group` equal blocks
                roles.append((node.output[0], "blocks", conv_groups(node)))
                roles.append((node.input[0], "blocks", conv_groups(node)))
            if op == "MatMul" and dims.rank(node.output[0]) != 2:  # channels last, where axis 1 is not
                for t in data + [layer.output]:
                    block(t, f"{label} works on the last axis of a tensor of rank {dims.rank(node.output[0]) or 'unknown'}")
                continue
            if layer.bias_node is not None:
                spaces.union(node.output[0], layer.output)
            roles.append((layer.output, "producer", layer))
            roles.append((node.input[0], "consumer", layer))
        elif r.kind == PER_CHANNEL and op != "Pad":
            if not data:
                continue
            spaces.union(data[0], node.output[0])
            for i, name in enumerate(node.input[1:], 1):
                if name and index.is_weight(name) and index.size(name) > 1:
                    _add_param(index, dims, node, name, roles, block)
                elif name and not index.is_weight(name) and op != "Clip":
                    block(node.output[0], f"{label} takes a computed parameter")
            if op == "BatchNormalization" and (attr(node, "training_mode", 0) or any(node.output[1:])):
                block(node.output[0], f"{label} runs in training mode")
        elif r.kind == ELEMENTWISE:
            if data:
                spaces.union(*data, node.output[0])
            if r.sums and len(data) > 1:
                sums.append(node)
            for name in node.input:
                if name and index.is_weight(name) and index.size(name) > 1:
                    _add_param(index, dims, node, name, roles, block)
        elif r.kind == REDUCE and data and _spatial_reduction(index, dims, node):
            spaces.union(data[0], node.output[0])
        elif op in ("Slice", "Pad") and data:
            reason = _spatial_only(index, dims, node)
            if reason:
                for t in data + [node.output[0]]:
                    block(t, reason)
            else:
                spaces.union(data[0], node.output[0])
        elif op == "Concat" and _channel_concat(index, dims, node):
            concats.append(node)
            for t in node.input:
                spaces.find(t)
            spaces.find(node.output[0])
        elif op == "Split" and data and (sizes := _channel_split(index, dims, node)):
            splits.append((node, sizes))
            for t in [node.input[0]] + list(node.output):
                spaces.find(t)
        elif (op == "Flatten" and int(attr(node, "axis", 1)) == 1) or (op == "Reshape" and _flattening_reshape(index, node)):
            spaces.union(node.input[0], node.output[0])
            roles.append((node.output[0], "flatten", node))
        else:
            why = r.reason if r.kind == BLOCKER else "maps channels in a way not handled here"
            for t in data + [o for o in node.output if o]:
                block(t, f"{label} {why}")
    for value in list(index.graph.input) + list(index.graph.output):
        block(value.name, f"graph {'input' if value in index.graph.input else 'output'} {value.name!r}")
    for name, readers in index.readers.items():
        for r in readers:
            if not isinstance(r, str) and any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                              for a in r.attribute):
                block(name, f"read inside a subgraph of {r.op_type} {r.name!r}")

    groups: dict[str, Group] = {}

    def group_of(tensor: str) -> Group:
        return groups.setdefault(spaces.find(tensor), Group(root=spaces.find(tensor)))

    for tensor in list(spaces.parent):
        group_of(tensor).tensors.add(tensor)
    for tensor, role, payload in roles:
        group = group_of(tensor)
        if role == "producer":
            group.producers.append(payload)
        elif role == "consumer":
            group.consumers.append(payload)
        elif role == "depthwise":
            group.depthwise.append(payload)
        elif role == "blocks":  # grouped convs: prune the same count in each of their blocks
            group.blocks = math.lcm(group.blocks, payload)
        elif role == "param":
            group.per_channel.append(payload)
        elif role == "flatten" and payload.op_type == "Reshape":
            group.reshapes.append(payload)
    for node in sums:
        group_of(node.output[0]).residual.append(node)
    for tensor, reason in blocked.items():
        group = groups.get(spaces.find(tensor))
        if group is not None and not group.blocked:
            group.blocked = reason
    links = _link_splits(splits, group_of)
    links += _link_concats(dims, concats, group_of)
    _propagate_blocks(links)
    return [g for g in groups.values() if g.producers]


def _link_concats(dims: TensorDims, concats, group_of) -> list:
    """Give each Concat input space a view into the output space; block what cannot be mapped.
    Returns the (input space, output space, via) links."""
    links = []
    for node in concats:
        out, parts = group_of(node.output[0]), [group_of(t) for t in node.input]
        label = f"Concat {node.name!r}"
        reason = ""
        if out.concat is not None:  # e.g. a residual sum of two concatenations
            reason = f"{label}'s output channels are also written by Concat {out.concat.name!r}"
        elif any(p is out for p in parts):
            reason = f"{label} reads its own output's channels"
        for part, tensor in zip(parts, node.input):
            if not (part.producers or part.depthwise or part.parts or part.split_of):
                part.static_width = dims.channels(tensor)
                if part.static_width is None:
                    reason = reason or f"{label}: the channel count of {tensor!r} is unknown"
        if reason:
            for g in parts + [out]:
                g.blocked = g.blocked or reason
            continue
        out.parts, out.concat = parts, node
        out.driven, out.producers = out.producers, []  # the parts decide its channels
        for position, part in enumerate(parts):
            part.views.append((out, position))
            links.append((part, out, label))
    return links


def _link_splits(splits, group_of) -> list:
    """Give each channel Split's input space its output spaces, with their sizes.
    Returns the (input space, output space, via) links."""
    links = []
    for node, sizes in splits:
        source, outputs = group_of(node.input[0]), [group_of(t) for t in node.output]
        reason = ""
        if any(o.producers for o in outputs):
            reason = f"Split {node.name!r}: an output's channels are also written by other layers"
        elif len({id(o) for o in outputs}) < len(outputs) or any(o is source for o in outputs):
            reason = f"Split {node.name!r}: its outputs meet again"
        if reason:
            for g in [source] + outputs:
                g.blocked = g.blocked or reason
            continue
        view = SplitView(node, outputs, sizes)
        source.splits.append(view)
        for position, out in enumerate(outputs):
            out.split_of = (view, position)
            links.append((source, out, f"Split {node.name!r}"))
    return links


def _propagate_blocks(links) -> None:
    """(source, target, via): a source space is only as prunable as every space it reaches."""
    changed = True
    while changed:
        changed = False
        for source, target, via in links:
            if target.blocked and not source.blocked:
                source.blocked = f"its channels reach {via}, whose output is left whole: {target.blocked}"
                changed = True


def describe_group(index: GraphIndex, group: Group) -> dict:
    """A group as ``inspect`` shows it: members, width, parameters tied to each channel."""
    first = group.producers[0]
    channels = int(index.initializers[first.weight].dims[first.out_axis])

    def size(name: str) -> int:
        return int(np.prod(index.initializers[name].dims))

    # every member's weights divide evenly by the channel count (consumers: blocks after a Flatten)
    per_channel = sum(size(layer.weight) for layer in group.producers + group.consumers) // channels
    per_channel += sum(size(node.input[1]) for node in group.depthwise) // channels + len(group.per_channel)
    # readers through Concat/Split ranges read one block of columns per channel too
    reached = list(reached_spaces(group))
    per_channel += sum(size(c.weight) // int(index.initializers[c.weight].dims[c.in_axis]) for g, _ in reached
                       for c in g.consumers)
    consumers = [c.name for c in group.consumers] + [f"{c.name} (via {via})" for g, via in reached for c in g.consumers]
    return {"kind": group.kind, "free": group.free, "producers": [p.name for p in group.producers], "consumers": consumers,
            "depthwise": [d.name for d in group.depthwise], "channels": channels,
            "params_per_channel": per_channel, "left_whole": group.blocked or None}


def reached_spaces(group: Group):
    """(space, via) for every space the group's channels reach through channel Concats and Splits."""
    for target, _ in group.views:
        yield target, f"Concat {target.concat.name!r}"
        yield from reached_spaces(target)
    for split in group.splits:
        for out in split.outputs:
            yield out, f"Split {split.node.name!r}"
            yield from reached_spaces(out)
