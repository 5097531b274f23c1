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
from scipy.linalg import lapack
from scipy.linalg.blas import dgemm, dsyrk


def im2col(x: np.ndarray, kernel, strides, pads, dilations, rows: np.ndarray | None = None) -> np.ndarray:
    """(B, C, *spatial) -> (B * outputs, C * prod(kernel)) patches, in the Conv weight's
    (C, *kernel) order; any number of spatial axes (Conv1d to Conv3d). With ``rows`` (indices
    into the B * outputs patches, batch-major), only those are gathered: a subsample of a
    large feature map never holds all its patches."""
    b, c, d = x.shape[0], x.shape[1], x.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    span = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    win = sliding_window_view(x, span, axis=tuple(range(2, 2 + d)))  # (B, C, *positions, *span)
    win = win[(slice(None),) * 2 + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, dl) for dl in dilations)]
    positions = win.shape[2:2 + d]
    if rows is not None:
        where = np.unravel_index(rows, (b,) + positions)
        return win[(where[0], slice(None)) + where[1:]].reshape(len(rows), c * int(np.prod(kernel)))
    order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return win.transpose(order).reshape(b * int(np.prod(positions)), c * int(np.prod(kernel)))


def patch_count(spatial, kernel, strides, pads, dilations) -> int:
    """Output positions of a convolution over ``spatial``."""
    d = len(spatial)
    return int(np.prod([(n + pads[i] + pads[i + d] - (k - 1) * dl - 1) // s + 1
                        for i, (n, k, s, dl) in enumerate(zip(spatial, kernel, strides, dilations))]))


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
    """Accumulates [X' 1]^T [X' 1] and [X' 1]^T Y in float64, a batch at a time, and solves a
    ridge problem: memory is the (F + 1) x (F + 1) Gram matrix whatever the number of rows.

    X'^T X' is accumulated by a symmetric rank-k update into its upper triangle (half the work
    of a product) and made whole when ``gram`` is read. Rows are buffered into blocks of at
    least BLOCK_ROWS first: an update reads and writes the whole F x F matrix, so a model run
    one sample at a time (a batch-1 export) gave 64-row updates that were memory-bound (five
    times slower on MobileNetV2's 960-wide layers)."""

    BLOCK_ROWS = 2048

    def __init__(self, features: int, outputs: int):
        self._xx = np.zeros((features, features), order="F")  # upper triangle of X'^T X'
        self._sum = np.zeros(features)
        self._gram: np.ndarray | None = None
        self._cross = np.zeros((features + 1, outputs))
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self.rows = 0
        self.energy = 0.0  # sum of squared targets: objective() + energy is the squared error

    @property
    def gram(self) -> np.ndarray:
        self._flush()
        if self._gram is None:
            f = len(self._sum)
            g = np.empty((f + 1, f + 1))
            g[:f, :f] = np.triu(self._xx) + np.triu(self._xx, 1).T
            g[:f, f] = g[f, :f] = self._sum
            g[f, f] = self.rows
            self._gram = g
        return self._gram

    @gram.setter
    def gram(self, value: np.ndarray) -> None:  # moments from a model instead of rows (math/regress.py)
        self._gram = value

    @property
    def cross(self) -> np.ndarray:
        self._flush()
        return self._cross

    @cross.setter
    def cross(self, value: np.ndarray) -> None:
        self._cross = value

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self._pending.append((x, y))
        self._pending_rows += len(x)
        self.rows += len(x)
        self.energy += float(np.einsum("rm,rm->", y, y, dtype=np.float64))
        self._gram = None
        if self._pending_rows >= self.BLOCK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        x = np.concatenate([np.asarray(a, np.float64) for a, _ in self._pending])
        y = np.concatenate([np.asarray(b, np.float64) for _, b in self._pending])
        self._pending, self._pending_rows = [], 0
        self._xx = dsyrk(1.0, x.T, beta=1.0, c=self._xx, trans=0, lower=0, overwrite_c=1)
        self._sum += x.sum(axis=0)
        self._cross[:-1] += x.T @ y
        self._cross[-1] += y.sum(axis=0)

    def solve(self, ridge: float = 1e-3, max_condition: float = 1e10) -> tuple[np.ndarray, np.ndarray] | None:
        """(W' as (outputs, features), b' as (outputs,)), or None when ill-conditioned."""
        f = self.gram.shape[0] - 1
        if self.rows == 0:
            return None
        a = regularized(self, ridge)
        if not well_conditioned(a, max_condition):
            return None
        sol = np.linalg.solve(a, self.cross)
        return sol[:f].T, sol[f]


def well_conditioned(a: np.ndarray, max_condition: float) -> bool:
    """Whether the symmetric matrix ``a`` is positive definite with a 1-norm condition number
    (LAPACK's estimate from its Cholesky factor, O(F^2) after the factor) under ``max_condition``.
    An SVD would cost ten times the solve it guards."""
    if not np.isfinite(a).all():
        return False
    factor, info = lapack.dpotrf(a, lower=0)
    if info != 0:
        return False
    rcond, info = lapack.dpocon(factor, float(np.abs(a).sum(axis=0).max()))
    return info == 0 and rcond * max_condition > 1.0


def regularized(fit: LeastSquaresFit, ridge: float) -> np.ndarray:
    """The Gram matrix with ridge on the weights (not on the bias column)."""
    f = fit.gram.shape[0] - 1
    reg = ridge * max(np.trace(fit.gram[:f, :f]) / max(f, 1), 1e-12)
    return fit.gram + np.diag(np.r_[np.full(f, reg), 0.0])


def objective(fit: LeastSquaresFit, w: np.ndarray, b: np.ndarray) -> float:
    """Squared error of (w, b) on the accumulated data, up to a constant."""
    wa = np.hstack([w, b[:, None]])
    return float(np.einsum("mf,mf->", wa @ fit.gram, wa) - 2.0 * np.einsum("mf,fm->", wa, fit.cross))  # one BLAS product


def select_channels(fit: LeastSquaresFit, channels: int, n_keep: int, ridge: float = 1e-3,
                    max_condition: float = 1e10) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Kept channels for one consumer's problem and its least-squares refit on them:
    (kept, W' (M, P * g), b' (M,)), or None when the problem is ill-conditioned."""
    chosen = select_channels_jointly([fit], channels, n_keep, ridge, max_condition)
    return None if chosen is None else (chosen[0],) + chosen[1][0]


def select_channels_jointly(fits: list[LeastSquaresFit], channels: int, n_keep: int, ridge: float = 1e-3,
                            max_condition: float = 1e10, weights=None) -> tuple[np.ndarray, list] | None:
    """Greedy backward elimination of whole channels (groups of features) by the group
    Optimal-Brain-Surgeon cost summed over every consumer that reads the channels, then each
    consumer's least-squares refit on what is kept.

    Features are channel-major: channel n owns features [n * g, (n + 1) * g), g = F / N (each
    consumer has its own g). Removing group G from the ridge solution beta = A^-1 C raises the
    error by tr(beta_G^T [(A^-1)_GG]^-1 beta_G); the inverse and the solution are downdated
    after each removal (Schur complement), so only one F x F inverse per consumer is formed.
    ``weights``: each consumer's cost is multiplied by its weight (1 / its target energy
    makes the sum one of relative errors: consumers of different scales count alike).
    Returns (kept channels, [(W' (M, P * g), b' (M,)) per consumer]), or None when a problem
    is ill-conditioned.
    """
    weights = np.ones(len(fits)) if weights is None else np.asarray(weights, np.float64)
    states = []
    for fit in fits:
        f = fit.gram.shape[0] - 1
        a = regularized(fit, ridge)
        if not well_conditioned(a, max_condition):
            return None
        states.append(_Elimination(np.linalg.inv(a), fit.cross, f // channels))
    alive = np.ones(channels, dtype=bool)
    for _ in range(channels - n_keep):
        live = np.flatnonzero(alive)
        pick = live[int(np.argmin(sum(w * state.costs(live) for w, state in zip(weights, states))))]
        for state in states:
            state.remove(pick)
        alive[pick] = False
    kept = np.flatnonzero(alive)
    return kept, [refit(fit, kept, channels, ridge) for fit in fits]


class _Elimination:
    """One consumer's ridge solution beta = A^-1 C and inverse A^-1, downdated as channels go.

    The inverse is updated in place by BLAS (no F x F temporaries) and compacted to the live
    features once a quarter of it is dead: a removed group's rows of the downdated inverse and
    solution are zero, so they need no clearing in between."""

    def __init__(self, inv: np.ndarray, cross: np.ndarray, g: int):
        self.inv = np.asfortranarray(inv)
        self.beta = inv @ cross
        self.g = g
        self.where = np.arange(len(inv))  # position of each feature in the compacted inverse (-1: gone)
        self.dead = 0

    def _positions(self, channels: np.ndarray) -> np.ndarray:
        return self.where[channels[:, None] * self.g + np.arange(self.g)]  # (G, g)

    def costs(self, live: np.ndarray) -> np.ndarray:
        """tr(beta_G^T [(A^-1)_GG]^-1 beta_G) for every live channel G."""
        idx = self._positions(live)
        blocks = self.inv[idx[:, :, None], idx[:, None, :]]  # (G, g, g)
        b = self.beta[idx]  # (G, g, M)
        return np.einsum("ngh,ngh->n", np.linalg.inv(blocks), b @ b.transpose(0, 2, 1))

    def remove(self, channel: int) -> None:
        best = self._positions(np.array([channel]))[0]
        s = np.linalg.inv(self.inv[np.ix_(best, best)])
        cols = np.array(self.inv[:, best])
        self.beta -= cols @ (s @ self.beta[best])
        self.inv = dgemm(-1.0, cols, s @ cols.T, beta=1.0, c=self.inv, overwrite_c=1)
        self.where[channel * self.g + np.arange(self.g)] = -1
        self.dead += self.g
        if self.dead * 4 > len(self.inv):
            keep = np.flatnonzero(self.where >= 0)
            rows = self.where[keep]
            self.inv = np.asfortranarray(self.inv[np.ix_(rows, rows)])
            self.beta = self.beta[rows]
            self.where[keep] = np.arange(len(keep))
            self.dead = 0


def refit(fit: LeastSquaresFit, kept: np.ndarray, channels: int, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """The regularised least-squares consumer (W' (M, P * g), b' (M,)) on the kept channels."""
    f = fit.gram.shape[0] - 1
    g = f // channels
    a = regularized(fit, ridge)
    rows = np.r_[(np.asarray(kept)[:, None] * g + np.arange(g)).ravel(), f]
    sol = np.linalg.solve(a[np.ix_(rows, rows)], fit.cross[rows])
    return sol[:-1].T, sol[-1]


def eliminate(fit: LeastSquaresFit, channels: int, n_keep: int, ridge: float = 1e-3,
              max_condition: float = 1e10) -> tuple[np.ndarray, np.ndarray] | None:
    """The channels that greedy elimination removes, in order, and what each removal added to
    the error (a budget's cost curve); None when the problem is ill-conditioned."""
    a = regularized(fit, ridge)
    if not well_conditioned(a, max_condition):
        return None
    state = _Elimination(np.linalg.inv(a), fit.cross, (fit.gram.shape[0] - 1) // channels)
    alive = np.ones(channels, dtype=bool)
    order, costs = [], []
    for _ in range(channels - n_keep):
        live = np.flatnonzero(alive)
        cost = state.costs(live)
        best = int(np.argmin(cost))
        order.append(live[best])
        costs.append(max(float(cost[best]), 0.0))
        state.remove(live[best])
        alive[live[best]] = False
    return np.array(order, dtype=np.int64), np.array(costs)
