"""Per-channel activations by name, with their parameters (the op table's vocabulary).

The channel analysis names every per-channel activation (or composite unit such as
x * Sigmoid(x)) as ``(name, params)``; the data-free model evaluates it here on arrays. Names
and defaults follow ONNX's operators (HardSigmoid alpha 0.2, beta 0.5; Elu alpha 1; Selu's
constants), PyTorch where ONNX has no op (silu, mish).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.special import erf, expit

SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


def _leaky(x, alpha=0.01):
    return np.where(x > 0, x, alpha * x)


def _clip(x, min=-np.inf, max=np.inf):  # noqa: A002 - ONNX's names
    return np.clip(x, min, max)


def _hard_sigmoid(x, alpha=0.2, beta=0.5):
    return np.clip(alpha * x + beta, 0.0, 1.0)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": _leaky,
    "prelu": lambda x, slope=0.25: _leaky(x, slope),
    "clip": _clip,
    "sigmoid": expit,
    "hard_sigmoid": _hard_sigmoid,
    "tanh": np.tanh,
    "silu": lambda x, beta=1.0: x * expit(beta * x),
    "hard_swish": lambda x: x * _hard_sigmoid(x, 1.0 / 6.0, 0.5),
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0))),
    "gelu_tanh": _gelu_tanh,
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "elu": _elu,
    "selu": lambda x: SELU_GAMMA * _elu(x, SELU_ALPHA),
    "softplus": _softplus,
}

# f(s x) = s f(x) for s >= 0: merging commutes with these (METHOD.md section 1).
HOMOGENEOUS = {"identity", "relu", "leaky_relu", "prelu"}


def activation(name: str, params: dict | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The function ``name`` with ``params`` bound, as a NumPy ufunc-like callable."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(FUNCTIONS))}")
    fn, params = FUNCTIONS[name], dict(params or {})
    return lambda x: fn(np.asarray(x, np.float64), **params)


def relu_slope(name: str, params: dict | None = None) -> float | None:
    """The negative slope of a ReLU-family activation (0 for relu), None for any other."""
    params = params or {}
    if name == "relu":
        return 0.0
    if name == "leaky_relu":
        return float(params.get("alpha", 0.01))
    if name == "prelu":
        return float(params.get("slope", 0.25))
    return None
