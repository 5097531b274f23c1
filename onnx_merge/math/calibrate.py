"""Least-squares refit of a consumer on real activations (issue: calibrated compensation).

For a consumer y = W x + b whose input lost channels, find W', b' minimising

    sum over samples || W' x' + b' - (W x + b) ||^2 + ridge * ||W'||^2

where x are the original model's inputs to the consumer and x' the compressed model's.
Statistics are accumulated batch by batch (memory bounded by a batch and the F x F Gram
matrix), then solved once.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """(B, C, *spatial) -> (B * outputs, C * prod(kernel)) patches, in the Conv weight's
    (C, *kernel) order; any number of spatial axes (Conv1d to Conv3d)."""
    b, c, d = x.shape[0], x.shape[1], x.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    span = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    win = sliding_window_view(x, span, axis=tuple(range(2, 2 + d)))  # (B, C, *positions, *span)
    win = win[(slice(None),) * 2 + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, dl) for dl in dilations)]
    positions = int(np.prod(win.shape[2:2 + d]))
    order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return win.transpose(order).reshape(b * positions, c * int(np.prod(kernel)))


def same_pads(spatial, kernel, strides, dilations, auto_pad: str) -> list[int]:
    """Explicit (begins..., ends...) pads for a Conv's auto_pad: VALID pads nothing; SAME_UPPER
    and SAME_LOWER pad so that the output has ceil(input / stride) positions, the odd pixel at
    the end or at the start."""
    if auto_pad == "VALID":
        return [0] * 2 * len(spatial)
    begins, ends = [], []
    for n, k, s, dl in zip(spatial, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * dl + 1 - n, 0)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


class LeastSquaresFit:
    """Accumulates X'^T X', X'^T Y for [X' 1] -> Y and solves a ridge problem."""

    def __init__(self, features: int, outputs: int):
        self.gram = np.zeros((features + 1, features + 1))
        self.cross = np.zeros((features + 1, outputs))
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        xa = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
        self.gram += xa.T @ xa
        self.cross += xa.T @ y.astype(np.float64)
        self.rows += len(x)

    def solve(self, ridge: float = 1e-3, max_condition: float = 1e10) -> tuple[np.ndarray, np.ndarray] | None:
        """(W' as (outputs, features), b' as (outputs,)), or None when ill-conditioned."""
        f = self.gram.shape[0] - 1
        if self.rows == 0:
            return None
        reg = ridge * max(np.trace(self.gram[:f, :f]) / max(f, 1), 1e-12)
        a = self.gram + np.diag(np.r_[np.full(f, reg), 0.0])
        if not np.isfinite(a).all() or np.linalg.cond(a) > max_condition:
            return None
        sol = np.linalg.solve(a, self.cross)
        return sol[:f].T, sol[f]


def regularized(fit: LeastSquaresFit, ridge: float) -> np.ndarray:
    """The Gram matrix with ridge on the weights (not on the bias column)."""
    f = fit.gram.shape[0] - 1
    reg = ridge * max(np.trace(fit.gram[:f, :f]) / max(f, 1), 1e-12)
    return fit.gram + np.diag(np.r_[np.full(f, reg), 0.0])


def objective(fit: LeastSquaresFit, w: np.ndarray, b: np.ndarray) -> float:
    """Squared error of (w, b) on the accumulated data, up to a constant."""
    wa = np.hstack([w, b[:, None]])
    return float(np.einsum("mf,fg,mg->", wa, fit.gram, wa) - 2.0 * np.einsum("mf,fm->", wa, fit.cross))


def select_channels(fit: LeastSquaresFit, channels: int, n_keep: int, ridge: float = 1e-3,
                    max_condition: float = 1e10) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Greedy backward elimination of whole channels (``eliminate``), then the least-squares
    consumer on what is kept: (kept channels, W' (M, P * g), b' (M,)), or None when the Gram
    matrix is ill-conditioned."""
    order = eliminate(fit, channels, n_keep, ridge, max_condition)
    if order is None:
        return None
    alive = np.ones(channels, dtype=bool)
    alive[order[0]] = False
    kept = np.flatnonzero(alive)
    return (kept,) + refit(fit, kept, channels, ridge)


def eliminate(fit: LeastSquaresFit, channels: int, n_keep: int, ridge: float = 1e-3,
              max_condition: float = 1e10) -> tuple[np.ndarray, np.ndarray] | None:
    """Channels removed one at a time by the group Optimal-Brain-Surgeon cost, in order, and
    what each removal added to the error; None when the Gram matrix is ill-conditioned.

    Features are channel-major: channel n owns features [n * g, (n + 1) * g), g = F / N.
    Removing group G from the ridge solution beta = A^-1 C raises the error by
    tr(beta_G^T [(A^-1)_GG]^-1 beta_G); the inverse and the solution are downdated after
    each removal (Schur complement), so only one F x F inverse is ever formed.
    """
    f = fit.gram.shape[0] - 1
    g = f // channels
    a = regularized(fit, ridge)
    if not np.isfinite(a).all() or np.linalg.cond(a) > max_condition:
        return None
    inv = np.linalg.inv(a)
    beta = inv @ fit.cross
    groups = np.arange(channels * g).reshape(channels, g)
    alive = np.ones(channels, dtype=bool)
    order, costs = [], []
    for _ in range(channels - n_keep):
        live = np.flatnonzero(alive)
        idx = groups[live]  # (G, g)
        blocks = inv[idx[:, :, None], idx[:, None, :]]  # (G, g, g)
        sol = np.linalg.solve(blocks, beta[idx])  # (G, g, M)
        cost = np.einsum("ngm,ngm->n", beta[idx], sol)
        best_live = int(np.argmin(cost))
        pick = live[best_live]
        order.append(pick)
        costs.append(max(float(cost[best_live]), 0.0))
        best = groups[pick]
        solve_block = np.linalg.inv(inv[np.ix_(best, best)])
        cols = inv[:, best]
        beta -= cols @ (solve_block @ beta[best])
        inv -= cols @ solve_block @ cols.T
        inv[best, :] = 0.0
        inv[:, best] = 0.0
        beta[best] = 0.0
        alive[pick] = False
    return np.array(order, dtype=np.int64), np.array(costs)


def refit(fit: LeastSquaresFit, kept: np.ndarray, channels: int, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """The regularised least-squares consumer (W' (M, P * g), b' (M,)) on the kept channels."""
    f = fit.gram.shape[0] - 1
    g = f // channels
    a = regularized(fit, ridge)
    rows = np.r_[(np.asarray(kept)[:, None] * g + np.arange(g)).ravel(), f]
    sol = np.linalg.solve(a[np.ix_(rows, rows)], fit.cross[rows])
    return sol[:-1].T, sol[-1]
