"""Per-channel statistics carried through a network without data (pure NumPy).

Each tensor is modelled channel by channel as a Gaussian with a mean and a variance, every
value independent of every other one (across channels and positions): the cheapest model
that still carries what a pruned channel leaves behind, its mean (which goes into the
consumer's bias) and its variance (the error left once the mean is restored, what the
choice of channels minimises). A layer's output is then N(W m + b, W^2 v) per channel, an
activation's E[f(u)] and Var f(u) come from quadrature under N(mean, var), a product of
independent factors (a squeeze-excitation gate) multiplies second moments.

The model ignores correlations; ``group_plan`` therefore only ranks channels by it and
fills in means, and reports its prediction as a prediction.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .moments import normal_quadrature


def layer_moments(mean: np.ndarray, var: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                  groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per output channel of a Conv/Gemm with ``weight`` (O, C / groups, taps...)
    over inputs with channel means and variances (C,), independent values."""
    w = np.asarray(weight, np.float64)
    out = w.shape[0]
    w = w.reshape(out, w.shape[1], -1)
    per_group_in, per_group_out = w.shape[1], out // groups
    m = np.asarray(mean, np.float64).reshape(groups, per_group_in)
    v = np.asarray(var, np.float64).reshape(groups, per_group_in)
    block = np.repeat(np.arange(groups), per_group_out)
    mean_out = np.einsum("oct,oc->o", w, m[block])
    var_out = np.einsum("oct,oc->o", w * w, v[block])
    if bias is not None:
        mean_out = mean_out + np.asarray(bias, np.float64).reshape(-1)
    return mean_out, var_out


def activation_stats(f: Callable, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[f(u)] and Var f(u) for u ~ N(mean, var) per channel."""
    x, w = normal_quadrature()
    mean, std = np.asarray(mean, np.float64), np.sqrt(np.maximum(np.asarray(var, np.float64), 0.0))
    values = f(mean[:, None] + std[:, None] * x[None, :])
    first = values @ w
    return first, np.maximum((values ** 2) @ w - first ** 2, 0.0)


def product_stats(mean_a, var_a, mean_b, var_b) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of a * b for independent a and b."""
    mean = mean_a * mean_b
    return mean, np.maximum((var_a + mean_a ** 2) * (var_b + mean_b ** 2) - mean ** 2, 0.0)


def removal_costs(var: np.ndarray, column_energy: np.ndarray) -> np.ndarray:
    """Expected squared output error of removing each channel once its mean is restored in the
    consumer's bias: Var(a_n) |V[:, n]|^2 (independent channels), summed over consumers by the caller."""
    return np.asarray(var, np.float64) * np.asarray(column_energy, np.float64)


def keep_least_costly(costs: np.ndarray, n_keep: int, blocks: int = 1) -> np.ndarray:
    """The ``n_keep`` channels whose removal costs most (sorted), the same count in each of ``blocks``
    equal blocks."""
    costs = np.asarray(costs, np.float64)
    n = len(costs)
    per, width = n_keep // blocks, n // blocks
    kept = [j * width + np.argsort(-costs[j * width:(j + 1) * width], kind="stable")[:per] for j in range(blocks)]
    return np.sort(np.concatenate(kept))


def relative_error(costs: np.ndarray, kept: np.ndarray) -> float:
    """What the removed channels cost relative to what all of them carry (0 when nothing does)."""
    costs = np.asarray(costs, np.float64)
    total = float(costs.sum())
    removed = np.setdiff1d(np.arange(len(costs)), kept)
    return float(costs[removed].sum()) / total if total > 0 else 0.0


def capped_keep(costs: np.ndarray, n_keep: int, max_error: float, step: int = 1) -> int:
    """At least ``n_keep`` channels, more where removing the cheapest ``n - n_keep`` would cost more
    than ``max_error`` of the total: the fewest kept (a multiple of ``step``) whose removed ones cost
    at most that. ``n`` (nothing removed) where even one step costs more."""
    costs = np.asarray(costs, np.float64)
    n, total = len(costs), float(costs.sum())
    if total <= 0 or max_error >= 1.0:
        return n_keep
    cumulative = np.concatenate([[0.0], np.cumsum(np.sort(costs))]) / total  # cost of removing the k cheapest
    for keep in range(n_keep, n + 1):
        if (keep % step == 0 or keep == n) and cumulative[n - keep] <= max_error + 1e-12:
            return keep
    return n
