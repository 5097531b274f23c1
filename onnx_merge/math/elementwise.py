"""Naming an elementwise function from its values: which activation a composite subgraph computes.

Exporters spell one activation many ways (SiLU as ``x * Sigmoid(x)``, GELU as
``0.5 * x * (1 + Erf(x / sqrt 2))``, HardSwish as ``x * Clip(x + 3, 0, 6) / 6``, ...). The analysis
evaluates such a subgraph on a grid and asks ``identify`` which named function it is; the name
(with its parameters) comes from the vocabulary the planners evaluate activations by.
"""

from __future__ import annotations

import numpy as np

from .activations import FUNCTIONS, HOMOGENEOUS  # noqa: F401 - HOMOGENEOUS is re-exported for ops

# Far points tell a ReLU from a Clip with a high bound, and bound every fitted range.
GRID = np.concatenate([np.linspace(-8.0, 8.0, 161), [-0.05, -1e-3, 1e-3, 0.05, -1e3, 1e3, -1e6, 1e6]])
TOLERANCE = 1e-5  # relative, per point; gelu and gelu_tanh differ by ~1e-4 of their values


# The functions come from the planners' vocabulary; the order is the order of the tries (relu
# before a clip, a fitted leaky_relu covers every PReLU slope, so prelu is not tried).
REFERENCE = {name: FUNCTIONS[name] for name in ("identity", "relu", "sigmoid", "tanh", "silu", "hard_sigmoid",
                                                "hard_swish", "gelu", "gelu_tanh", "mish", "softplus", "elu", "selu",
                                                "leaky_relu", "clip")}


def _fitted_params(name: str, x: np.ndarray, y: np.ndarray) -> dict:
    """Parameters of ``name`` read off the values (checked afterwards against the whole grid)."""
    at = dict(zip(x.tolist(), y.tolist()))
    if name == "silu":  # y(1) = sigmoid(beta)
        s = float(np.clip(at[1.0], 1e-12, 1 - 1e-12))
        return {"beta": float(np.log(s / (1 - s)))}
    if name == "leaky_relu":
        return {"alpha": -at[-1.0]}
    if name == "elu":
        return {"alpha": -at[-8.0] / -np.expm1(-8.0)}
    if name == "hard_sigmoid":  # y = alpha x + beta near 0
        return {"alpha": (at[0.05] - at[-0.05]) / 0.1, "beta": at[0.0]}
    if name == "clip":
        return {"min": float(y.min()), "max": float(y.max())}
    return {}


def identify(f) -> tuple[str, dict] | None:
    """The name and parameters of the elementwise function ``f`` (NumPy in, NumPy out), or None.

    A clip at 0 with no upper bound within the grid is ``relu`` (checked first); a scale fit
    that lands on a default (silu's beta 1) is dropped from the parameters."""
    x = np.unique(np.concatenate([GRID, [0.0]]))
    with np.errstate(all="ignore"):
        y = np.asarray(f(x), dtype=np.float64)
    if y.shape != x.shape or not np.all(np.isfinite(y)):
        return None
    for name, ref in REFERENCE.items():
        params = _fitted_params(name, x, y)
        if any(not np.isfinite(v) for v in params.values()):
            continue
        with np.errstate(all="ignore"):
            expected = ref(x, **params)
        if np.all(np.abs(expected - y) <= TOLERANCE * (1.0 + np.abs(expected))):
            return _canonical(name, params)
    return None


def _canonical(name: str, params: dict) -> tuple[str, dict]:
    rounded = {k: float(np.round(v, 6)) for k, v in params.items()}
    if name == "silu" and abs(rounded["beta"] - 1.0) < 1e-5:
        return "silu", {}
    if name == "hard_sigmoid" and abs(rounded["alpha"] - 1 / 6) < 1e-5 and rounded["beta"] == 0.5:
        return "hard_sigmoid", {"alpha": 1 / 6, "beta": 0.5}
    return name, rounded
