"""The op table: how channels flow through each ONNX op type. Every analysis asks it.

One ``Rule`` per op type says which *kind* of op it is for the channels of its data input:

- ``layer``: Conv, ConvTranspose, Gemm, MatMul: which weight axis holds output and input
  channels, the bias input, the MAC formula (groups, a MatMul's bias Add: ``groups.describe_layer``).
- ``per-channel``: each channel on its own (activations, BN, pools, Dropout, zero Pad, Resize);
  ``homogeneous`` when it commutes with a positive per-channel scale (a merge is exact through
  it), ``activation`` its name in the planners' vocabulary (``math/activations.FUNCTIONS``).
- ``elementwise``: Add, Mul, ... between feature maps: couples its inputs into one group;
  ``sums`` marks an additive join (a residual stream), a Mul is a gate. With scalar constants
  only it is arithmetic inside a *composite unit* (``match_unit``: SiLU as ``x * Sigmoid(x)``,
  GELU's erf and tanh forms, HardSwish as ``x * Clip(x + 3, 0, 6) / 6``, Mish, ...).
- ``reduce`` (over spatial axes: per channel), ``index-map`` (Concat, Split, Slice over
  channels), ``reshape`` (Flatten, Reshape, Transpose with a provable mapping).
- ``blocker``: leaves the channels whole, with the reason. An op not in the table blocks.

Adding a per-channel activation is one entry: ``"Foo": activation("foo", fn=lambda n, x: ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from scipy import special

from .graph import GraphIndex, attr
from .math.elementwise import HOMOGENEOUS, identify

LAYER, PER_CHANNEL, ELEMENTWISE, REDUCE, INDEX_MAP, RESHAPE, BLOCKER = (
    "layer", "per-channel", "elementwise", "reduce", "index-map", "reshape", "blocker")


class Decline(Exception):
    """A "no" with its user-facing reason: the structure is left as it is."""


@dataclass(frozen=True)
class Rule:
    kind: str
    activation: str | None = None  # the planners' name for this per-channel function
    describe: Callable | None = None  # (index, node) -> (activation, params): parameters or a name that depends on them
    homogeneous: bool = False  # commutes with a positive per-channel scale
    spatial: bool = False  # works over the spatial axes: the channels must be on axis 1
    sums: bool = False  # elementwise: adds feature maps (a residual stream)
    fn: Callable | None = None  # (node, values) -> value, in NumPy: evaluates a composite unit
    axes: Callable | None = None  # layer: node -> (output-channel axis, input-channel axis) of the weight
    macs: Callable | None = None  # layer: (node, output, weight, input shapes) -> multiply-accumulates
    reason: str = ""  # blocker: why


def activation(name: str | None, fn=None, describe=None, homogeneous: bool | None = None, **kw) -> Rule:
    return Rule(PER_CHANNEL, activation=name, fn=fn, describe=describe,
                homogeneous=name in HOMOGENEOUS if homogeneous is None else homogeneous, **kw)


def _unary(f):
    return lambda node, values: f(values[0])


def _binary(f):
    return lambda node, values: f(values[0], values[1])


def _bounds(index: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    """A Clip's bounds (attributes before opset 11, constant inputs after); None when computed."""
    if len(node.input) == 1:
        return float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))
    names = [node.input[i] if i < len(node.input) else "" for i in (1, 2)]
    if any(n and not index.is_weight(n) for n in names):
        return None
    low, high = (float(index.array(n).reshape(-1)[0]) if n else d for n, d in zip(names, (-np.inf, np.inf)))
    return low, high


def _clip_describe(index, node):
    bounds = _bounds(index, node)
    if bounds is None:
        return None, {}
    low, high = bounds
    if low == 0.0 and high >= float(np.finfo(np.float32).max):  # torch.clamp(x, min=0): a ReLU
        return "relu", {}
    return "clip", {"min": low, "max": high}


def _clip_fn(node, values):
    low = values[1] if len(values) > 1 and values[1] is not None else attr(node, "min", -np.inf)
    high = values[2] if len(values) > 2 and values[2] is not None else attr(node, "max", np.inf)
    return np.clip(values[0], low, high)


def _prelu_describe(index, node):
    slope = index.array(node.input[1]) if index.is_weight(node.input[1]) else None
    if slope is None:
        return "prelu", {}
    return "prelu", {"slope": float(slope.reshape(-1)[0]) if slope.size == 1 else slope}


def _gelu_describe(index, node):
    return ("gelu_tanh" if attr(node, "approximate", "none") == "tanh" else "gelu"), {}


def _gelu_fn(node, values):
    x = values[0]
    if attr(node, "approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _elu(alpha, x):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def _conv_macs(node, out, weight, inp):
    return int(np.prod(out[1:])) * int(np.prod(weight[1:]))


def _conv_transpose_macs(node, out, weight, inp):
    return int(np.prod(inp[1:])) * int(np.prod(weight[1:])) if inp else 0


def _gemm_axes(node):
    return (0, 1) if attr(node, "transB", 0) else (1, 0)


def _gemm_macs(node, out, weight, inp):
    if len(weight) != 2:  # a malformed weight counts nothing
        return 0
    return int(np.prod(out)) * (weight[1] if attr(node, "transB", 0) else weight[0])


def _matmul_macs(node, out, weight, inp):
    return int(np.prod(out)) * weight[-2 if len(weight) > 1 else 0]


def _pool(**kw) -> Rule:
    return Rule(PER_CHANNEL, homogeneous=True, spatial=True, **kw)


def _join(f=None, sums=False) -> Rule:
    return Rule(ELEMENTWISE, fn=f and _binary(f), sums=sums)


def _blocker(reason: str) -> Rule:
    return Rule(BLOCKER, reason=reason)


QUANTIZED = "is a quantized layer: compress the float model, then quantize it"
OPS: dict[str, Rule] = {
    # layers
    "Conv": Rule(LAYER, axes=lambda n: (0, 1), macs=_conv_macs),
    "ConvTranspose": Rule(LAYER, axes=lambda n: (1, 0), macs=_conv_transpose_macs),
    "Gemm": Rule(LAYER, axes=_gemm_axes, macs=_gemm_macs),
    "MatMul": Rule(LAYER, axes=lambda n: (1, 0), macs=_matmul_macs),
    # activations, one function per channel
    "Relu": activation("relu", fn=_unary(lambda x: np.maximum(x, 0.0))),
    "LeakyRelu": activation("leaky_relu", describe=lambda i, n: ("leaky_relu", {"alpha": float(attr(n, "alpha", 0.01))}),
                            fn=lambda n, v: np.where(v[0] >= 0, v[0], float(attr(n, "alpha", 0.01)) * v[0])),
    "PRelu": activation("prelu", describe=_prelu_describe, fn=lambda n, v: np.where(v[0] >= 0, v[0], v[1] * v[0])),
    "Clip": activation("clip", describe=_clip_describe, fn=_clip_fn),
    "Sigmoid": activation("sigmoid", fn=_unary(special.expit)),
    "HardSigmoid": activation("hard_sigmoid", describe=lambda i, n: (
        "hard_sigmoid", {"alpha": float(attr(n, "alpha", 0.2)), "beta": float(attr(n, "beta", 0.5))}),
        fn=lambda n, v: np.clip(float(attr(n, "alpha", 0.2)) * v[0] + float(attr(n, "beta", 0.5)), 0, 1)),
    "Swish": activation("silu", describe=lambda index, node: ("silu", {"beta": float(attr(node, "alpha", 1.0))}),
                        fn=lambda node, v: v[0] * special.expit(float(attr(node, "alpha", 1.0)) * v[0])),
    "HardSwish": activation("hard_swish", fn=_unary(lambda x: x * np.clip(x / 6 + 0.5, 0, 1))),
    "Tanh": activation("tanh", fn=_unary(np.tanh)),
    "Softplus": activation("softplus", fn=_unary(lambda x: np.logaddexp(0.0, x))),
    "Mish": activation("mish", fn=_unary(lambda x: x * np.tanh(np.logaddexp(0.0, x)))),
    "Gelu": activation("gelu", describe=_gelu_describe, fn=_gelu_fn),
    "Elu": activation("elu", describe=lambda i, n: ("elu", {"alpha": float(attr(n, "alpha", 1.0))}),
                      fn=lambda n, v: _elu(float(attr(n, "alpha", 1.0)), v[0])),
    "Selu": activation("selu", fn=_unary(lambda x: 1.0507009873554805 * _elu(1.6732632423543772, x))),
    "Celu": activation(None, fn=lambda n, v: np.maximum(v[0], 0) + np.minimum(0, float(attr(n, "alpha", 1.0)) * np.expm1(
        np.minimum(v[0], 0) / float(attr(n, "alpha", 1.0))))),
    "ThresholdedRelu": activation(None, fn=lambda n, v: np.where(v[0] > float(attr(n, "alpha", 1.0)), v[0], 0.0)),
    "Softsign": activation(None, fn=_unary(lambda x: x / (1 + np.abs(x)))),
    "Erf": activation(None, fn=_unary(special.erf)),
    "Exp": activation(None, fn=_unary(np.exp)),
    "Log": activation(None, fn=_unary(np.log)),
    "Sqrt": activation(None, fn=_unary(np.sqrt)),
    "Reciprocal": activation(None, fn=_unary(lambda x: 1.0 / x)),
    "Abs": activation(None, fn=_unary(np.abs)),
    "Neg": activation(None, fn=_unary(np.negative)),
    "Identity": activation("identity", fn=_unary(lambda x: x)),
    "Dropout": activation("identity", fn=_unary(lambda x: x)),  # inference: the identity (its mask is checked)
    # per channel, not activations
    "BatchNormalization": Rule(PER_CHANNEL),  # affine per channel: merging through it needs its statistics
    "InstanceNormalization": Rule(PER_CHANNEL),
    "MaxPool": _pool(), "AveragePool": _pool(), "GlobalAveragePool": _pool(), "GlobalMaxPool": _pool(),
    "LpPool": _pool(), "Pad": _pool(), "Resize": _pool(), "Upsample": _pool(),
    # between feature maps (or with scalar constants: arithmetic inside a composite unit)
    "Add": _join(np.add, sums=True), "Sub": _join(np.subtract, sums=True), "Sum": Rule(ELEMENTWISE, sums=True),
    "Mean": Rule(ELEMENTWISE, sums=True), "Max": _join(np.maximum, sums=True), "Min": _join(np.minimum, sums=True),
    "Mul": _join(np.multiply), "Div": _join(np.divide), "Pow": _join(np.power),
    "ReduceMean": Rule(REDUCE), "ReduceMax": Rule(REDUCE), "ReduceMin": Rule(REDUCE), "ReduceSum": Rule(REDUCE),
    "ReduceL2": Rule(REDUCE), "ReduceL1": Rule(REDUCE),
    "Concat": Rule(INDEX_MAP), "Split": Rule(INDEX_MAP), "Slice": Rule(INDEX_MAP),
    "Flatten": Rule(RESHAPE), "Reshape": Rule(RESHAPE), "Transpose": Rule(RESHAPE),
    "Softmax": _blocker("normalizes across channels"), "LogSoftmax": _blocker("normalizes across channels"),
    "LayerNormalization": _blocker("normalizes across channels"),
    "LRN": _blocker("normalizes across neighbouring channels"),
    "QLinearConv": _blocker(QUANTIZED), "QLinearMatMul": _blocker(QUANTIZED), "ConvInteger": _blocker(QUANTIZED),
    "MatMulInteger": _blocker(QUANTIZED),
}


def rule(op_type: str) -> Rule:
    """The op's rule; an op not in the table blocks."""
    return OPS.get(op_type) or _blocker("maps channels in a way not handled here")


def weight_axes(node: onnx.NodeProto) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of a layer's weight, from the op table."""
    return rule(node.op_type).axes(node)


def along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """One value per channel shaped to broadcast along ``axis`` of an ``ndim``-D weight."""
    return values.reshape([-1 if a == axis else 1 for a in range(ndim)])


def is_layer(node: onnx.NodeProto) -> bool:
    return rule(node.op_type).kind == LAYER


def conv_groups(node: onnx.NodeProto) -> int:
    return int(attr(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1


def is_depthwise(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Conv whose output channel n reads input channel n alone (group = channels, one filter each)."""
    if node.op_type != "Conv" or len(node.input) < 2 or not index.is_weight(node.input[1]):
        return False
    dims = index.initializers[node.input[1]].dims
    return conv_groups(node) > 1 and dims[1] == 1 and dims[0] == conv_groups(node)


@dataclass
class Activation:
    name: str | None  # in the planners' vocabulary; None for a per-channel function without one
    params: dict
    homogeneous: bool


def activation_of(index: GraphIndex, node: onnx.NodeProto) -> Activation | None:
    """What a per-channel activation node computes; None when it is not one."""
    r = rule(node.op_type)
    if r.kind != PER_CHANNEL or r.spatial or node.op_type in ("BatchNormalization", "InstanceNormalization"):
        return None
    name, params = r.describe(index, node) if r.describe else (r.activation, {})
    return Activation(name, params, name in HOMOGENEOUS)


# ---- composite units ------------------------------------------------------------------------

@dataclass
class Unit:
    """Elementwise nodes that together apply one function to each value of their input."""

    nodes: list[onnx.NodeProto]
    output: str
    activation: Activation


def _scalar(index: GraphIndex, name: str) -> bool:
    return index.is_weight(name) and index.size(name) == 1


def match_unit(index: GraphIndex, tensor: str, limit: int = 24) -> Unit | None:
    """The smallest subgraph reading only ``tensor`` (and scalar constants) through elementwise
    ops of the table that leaves one tensor read outside it: a composite activation. Its
    function is evaluated on a grid and named (``math.elementwise.identify``)."""
    nodes: list[onnx.NodeProto] = []
    produced, live = {tensor}, {tensor}
    while len(nodes) < limit:
        ready = None
        for t in live:
            for r in index.readers.get(t, []):
                if isinstance(r, str) or r in nodes or rule(r.op_type).fn is None or len(r.output) != 1:
                    continue
                if r.op_type == "Dropout" and len(r.output) > 1:
                    continue
                if all(not i or i in produced or _scalar(index, i) for i in r.input) and any(i in produced for i in r.input):
                    ready = r
                    break
            if ready is not None:
                break
        if ready is None:
            return None
        nodes.append(ready)
        produced.add(ready.output[0])
        live = {t for t in live | {ready.output[0]} if any(r not in nodes for r in index.readers.get(t, []))}
        if len(live) == 1 and tensor not in live:
            out = live.pop()
            # trailing arithmetic with a constant belongs to the unit: HardSwish's "/ 6"
            while (nxt := index.sole_reader(out)) is not None and not isinstance(nxt, str) and \
                    nxt.op_type in ("Mul", "Div", "Add", "Sub") and out in nxt.input and \
                    all(i == out or _scalar(index, i) for i in nxt.input):
                nodes.append(nxt)
                out = nxt.output[0]
            return Unit(nodes, out, _name_unit(index, nodes, tensor, out))
    return None


def _name_unit(index: GraphIndex, nodes: list[onnx.NodeProto], tensor: str, out: str) -> Activation:
    def evaluate(x):
        values = {tensor: x}
        for node in nodes:
            args = [values[i] if i in values else index.array(i).astype(np.float64).reshape(()) if i else None
                    for i in node.input]
            values[node.output[0]] = rule(node.op_type).fn(node, args)
        return values[out]

    found = identify(evaluate)
    name, params = found if found else (None, {})
    return Activation(name, params, name in HOMOGENEOUS)
