"""Data-free statistics of a network's tensors: a mean and a variance per channel, carried
from an input model through the graph (``math/propagate.py`` has the numbers).

The input is taken as N(0, 1) per channel (a normalised image or feature); a
BatchNormalization or LayerNormalization resets what reaches it to its own affine parameters
(what it produces on its training data: N(beta, gamma^2)). Conv, Gemm and MatMul with a
weight, named activations (single ops and composite units such as ``x * Sigmoid(x)``),
products and sums of independent tensors, pools and flattening ops are modelled; any other op
ends the model there (its outputs have no statistics, and whoever needs them falls back).
Channels are on axis 1 (NCHW, or the features of a 2-D tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphIndex, attr
from .math.activations import FUNCTIONS, activation
from .math.propagate import activation_stats, layer_moments, product_stats
from .ops import activation_of, match_unit

PASS = {"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Pad", "Resize", "Upsample"}
POOLS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "ReduceMean"}


@dataclass
class Stats:
    mean: np.ndarray
    var: np.ndarray
    rank: int | None = None  # of the tensor where known (4 for NCHW)
    # read from a BatchNormalization or LayerNormalization's own parameters, through per-channel
    # ops only: what that layer produced on its training data. Statistics carried through a
    # layer from the assumed input are not (measured: their means and variances mislead, BENCHMARKS.md)
    anchored: bool = False


def _rank_of(index: GraphIndex, name: str) -> int | None:
    for info in list(index.graph.input) + list(index.graph.value_info) + list(index.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def _const(index: GraphIndex, name: str, channels: int) -> np.ndarray | None:
    """A constant input broadcast per channel (a scalar, or one value per channel), else None."""
    if not index.is_weight(name):
        return None
    arr = index.array(name).astype(np.float64)
    if arr.size == 1:
        return np.full(channels, float(arr.reshape(-1)[0]))
    if arr.size == channels and max(arr.shape) == channels:
        return arr.reshape(-1)
    return None


def _named(act) -> tuple[str, dict] | None:
    return (act.name, act.params) if act is not None and act.name in FUNCTIONS else None


def tensor_statistics(model: onnx.ModelProto | GraphIndex, input_mean: float = 0.0,
                      input_var: float = 1.0) -> dict[str, Stats]:
    """Per-channel statistics of every tensor the model reaches, keyed by tensor name."""
    index = model if isinstance(model, GraphIndex) else GraphIndex(model)
    stats: dict[str, Stats] = {}
    for inp in index.graph.input:
        if index.is_weight(inp.name):
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].dim_value > 0:
            c = dims[1].dim_value
            stats[inp.name] = Stats(np.full(c, input_mean), np.full(c, input_var), len(dims))
    inside: set[int] = set()  # nodes of a composite unit, handled with its first node
    for node in index.graph.node:
        if id(node) in inside:
            continue
        try:
            out = _node_stats(index, node, stats, inside)
        except (ValueError, IndexError, KeyError):  # a shape this model does not cover
            out = None
        if out is not None and out[1] is not None:
            name, s = out
            if np.all(np.isfinite(s.mean)) and np.all(np.isfinite(s.var)):
                stats[name] = s
    return stats


def _node_stats(index: GraphIndex, node: onnx.NodeProto, stats: dict[str, Stats], inside: set[int]):
    data = [i for i in node.input if i and not index.is_weight(i)]
    if not data or data[0] not in stats:
        return None
    x = stats[data[0]]
    op = node.op_type
    if len(data) == 1 and op in ("Mul", "Sigmoid", "Tanh", "Div", "Add", "Sub", "Erf", "HardSigmoid", "Clip", "Max",
                                 "Min", "Relu", "HardSwish", "LeakyRelu", "Gelu", "Softplus", "Mish", "Elu", "Selu"):
        unit = None
        if op not in ("Relu", "HardSwish", "LeakyRelu", "Gelu"):
            unit = match_unit(index, data[0])
        if unit is not None and unit.nodes[0] is node and _named(unit.activation):
            inside.update(id(n) for n in unit.nodes)
            m, v = activation_stats(activation(*_named(unit.activation)), x.mean, x.var)
            return unit.output, Stats(m, v, x.rank, x.anchored)
    act = activation_of(index, node)
    if act is not None and len(data) == 1:
        named = _named(act)
        if named is None:
            return None
        m, v = activation_stats(activation(*named), x.mean, x.var)
        return node.output[0], Stats(m, v, x.rank, x.anchored)
    if op == "Conv" and index.is_weight(node.input[1]):
        bias = index.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        m, v = layer_moments(x.mean, x.var, index.array(node.input[1]), bias, int(attr(node, "group", 1)))
        return node.output[0], Stats(m, v, x.rank)
    if op == "Gemm" and index.is_weight(node.input[1]) and x.rank == 2:
        w = index.array(node.input[1]).astype(np.float64) * float(attr(node, "alpha", 1.0))
        w = w if attr(node, "transB", 0) else w.T
        if attr(node, "transA", 0):
            return None
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.broadcast_to(index.array(node.input[2]).reshape(-1), (w.shape[0],)) * float(attr(node, "beta", 1.0))
        m, v = layer_moments(x.mean, x.var, w, bias)
        return node.output[0], Stats(m, v, 2)
    if op == "MatMul" and x.rank == 2 and index.is_weight(node.input[1]) and len(index.shape(node.input[1])) == 2:
        m, v = layer_moments(x.mean, x.var, index.array(node.input[1]).T)
        return node.output[0], Stats(m, v, 2)
    if op in ("Add", "Sub", "Mul", "Div"):
        return node.output[0], _binary(index, node, stats, x)
    if op == "BatchNormalization":
        gamma, beta = (index.array(n).astype(np.float64).reshape(-1) for n in node.input[1:3])
        return node.output[0], Stats(beta.copy(), gamma ** 2, x.rank, True)
    if op in POOLS:
        if op == "ReduceMean" and not all(a >= 2 or a < -1 for a in (attr(node, "axes") or [])):
            return None
        return node.output[0], Stats(x.mean.copy(), x.var.copy(), x.rank if attr(node, "keepdims", 1) else 2, x.anchored)
    if op in PASS:
        if op == "Flatten" or op == "Reshape":
            return node.output[0], Stats(x.mean, x.var, 2, x.anchored) if x.rank in (2, None) or _spatial_one(index, data[0]) else None
        return node.output[0], x
    return None


def _spatial_one(index: GraphIndex, name: str) -> bool:
    """Whether the tensor's spatial dims are all 1 (a pooled map): flattening keeps one feature per channel."""
    for info in list(index.graph.value_info) + list(index.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            return len(dims) > 2 and all(d.dim_value == 1 for d in dims[2:])
    node = index.producer.get(name)
    return node is not None and node.op_type in ("GlobalAveragePool", "GlobalMaxPool")


def _binary(index: GraphIndex, node: onnx.NodeProto, stats: dict[str, Stats], x: Stats) -> Stats | None:
    a_name, b_name = node.input[0], node.input[1]
    op = node.op_type
    c = len(x.mean)
    if a_name in stats and b_name in stats:
        a, b = stats[a_name], stats[b_name]
        if len(a.mean) != len(b.mean) or op == "Div":
            return None
        rank = a.rank if (a.rank or 0) >= (b.rank or 0) else b.rank
        if op == "Mul":
            return Stats(*product_stats(a.mean, a.var, b.mean, b.var), rank, a.anchored and b.anchored)
        sign = 1.0 if op == "Add" else -1.0
        return Stats(a.mean + sign * b.mean, a.var + b.var, rank, a.anchored and b.anchored)
    const_name = b_name if a_name in stats else a_name
    k = _const(index, const_name, c)
    if k is None:
        return None
    if op == "Add":
        return Stats(x.mean + k, x.var, x.rank, x.anchored)
    if op == "Sub":
        return Stats(x.mean - k, x.var, x.rank, x.anchored) if a_name in stats else Stats(k - x.mean, x.var, x.rank, x.anchored)
    if op == "Mul":
        return Stats(x.mean * k, x.var * k * k, x.rank, x.anchored)
    if op == "Div" and a_name in stats and np.all(k != 0):
        return Stats(x.mean / k, x.var / (k * k), x.rank, x.anchored)
    return None
