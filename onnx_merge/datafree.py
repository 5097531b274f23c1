"""What the data-free model reads from the graph: a chain's activation by name, and what the
graph says about a producer's input. The numbers themselves are ``math/``'s.

Activations are named in the vocabulary of ``onnx_merge.math.activations``. The channel
analysis names composite units itself (``chain.activation``) where it has them; single ONNX
activation ops are named here.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphIndex, attr
from .groups import Chain, Layer
from .math.regress import InputModel

# Ops between the activation and the consumer that a linear reconstruction passes through:
# each is linear per channel, so a removed channel's regression on the kept ones (and its
# constant) reaches the consumer unchanged. A MaxPool or another activation would not.
LINEAR = {"Dropout", "Identity", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "ReduceMean",
          "Pad", "Resize", "Upsample"}


def _scalar(index: GraphIndex, node: onnx.NodeProto, position: int, default: float) -> float | None:
    """A constant scalar input of ``node``, ``default`` when absent, None when computed."""
    if len(node.input) <= position or not node.input[position]:
        return default
    name = node.input[position]
    if not index.is_weight(name) or index.size(name) != 1:
        return None
    return float(index.array(name).reshape(-1)[0])


def _clip(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, dict] | None:
    if len(node.input) > 1:  # opset 11+: bounds are inputs
        low, high = _scalar(index, node, 1, -np.inf), _scalar(index, node, 2, np.inf)
        if low is None or high is None:
            return None
    else:
        low, high = float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))
    if low == 0.0 and high >= float(np.finfo(np.float32).max):
        return "relu", {}
    return "clip", {"min": low, "max": high}


def _prelu(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, dict] | None:
    slope = _scalar(index, node, 1, 0.25)
    return None if slope is None else ("prelu", {"slope": slope})


def _max(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, dict] | None:
    consts = [i for i in node.input if index.is_weight(i)]
    if len(node.input) == 2 and len(consts) == 1 and index.size(consts[0]) == 1 \
            and float(index.array(consts[0]).reshape(-1)[0]) == 0.0:
        return "relu", {}
    return None


def _selu(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, dict] | None:
    default = np.isclose(attr(node, "alpha", 1.67326), 1.67326, atol=1e-4) and \
        np.isclose(attr(node, "gamma", 1.0507), 1.0507, atol=1e-4)
    return ("selu", {}) if default else None


ONNX_ACTIVATIONS = {
    "Relu": lambda index, node: ("relu", {}),
    "LeakyRelu": lambda index, node: ("leaky_relu", {"alpha": float(attr(node, "alpha", 0.01))}),
    "PRelu": _prelu,
    "Clip": _clip,
    "Max": _max,
    "Sigmoid": lambda index, node: ("sigmoid", {}),
    "HardSigmoid": lambda index, node: ("hard_sigmoid", {"alpha": float(attr(node, "alpha", 0.2)),
                                                          "beta": float(attr(node, "beta", 0.5))}),
    "Tanh": lambda index, node: ("tanh", {}),
    "HardSwish": lambda index, node: ("hard_swish", {}),
    "Gelu": lambda index, node: ("gelu_tanh", {}) if attr(node, "approximate", "none") in ("tanh", b"tanh")
    else ("gelu", {}),
    "Mish": lambda index, node: ("mish", {}),
    "Elu": lambda index, node: ("elu", {"alpha": float(attr(node, "alpha", 1.0))}),
    "Selu": _selu,
    "Softplus": lambda index, node: ("softplus", {}),
}


def node_activation(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, dict] | None:
    """A single ONNX activation op by vocabulary name, or None."""
    rule = ONNX_ACTIVATIONS.get(node.op_type)
    return None if rule is None else rule(index, node)


def chain_activation(index: GraphIndex, chain: Chain) -> tuple[str, dict] | None:
    """The chain's one activation, or None where the model cannot see through its path (no
    activation, several, or an op after it that a linear reconstruction does not pass)."""
    named = getattr(chain, "activation", None)
    if named is not None:
        return named
    found = None
    for node in chain.path:
        if node.op_type in LINEAR:
            continue
        act = node_activation(index, node)
        if act is None or found is not None:
            return None
        found = act
    return found


def input_model(index: GraphIndex, layer: Layer) -> InputModel | None:
    """What the graph says about ``layer``'s input, one entry per input channel: a LayerNormalization over the last axis gives x ~ N(bias, scale^2) per feature, an inference
    BatchNormalization x ~ N(beta, gamma^2) per channel. None where nothing before it says more."""
    features = int(index.initializers[layer.weight].dims[layer.in_axis])
    source = index.producer.get(layer.node.input[0])
    if not isinstance(source, onnx.NodeProto):
        return None
    params = [n for n in source.input[1:] if n]
    if not params or not all(index.is_weight(n) for n in params):
        return None
    if source.op_type == "LayerNormalization" and int(attr(source, "axis", -1)) == -1:
        scale = index.array(source.input[1]).reshape(-1).astype(np.float64)
        bias = index.array(source.input[2]).reshape(-1).astype(np.float64) if len(params) > 1 else np.zeros_like(scale)
        name = "layernorm"
    elif source.op_type == "BatchNormalization" and len(source.output) == 1:
        scale = index.array(source.input[1]).reshape(-1).astype(np.float64)
        bias = index.array(source.input[2]).reshape(-1).astype(np.float64)
        name = "batchnorm before"
    else:
        return None
    if len(scale) != features or len(bias) != features:
        return None
    return InputModel(bias, scale ** 2, name)
