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
    """(B, C, H, W) -> (B * Ho * Wo, C * kh * kw) patches, in the Conv weight's (C, kh, kw) order."""
    b, c = x.shape[:2]
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(x, span, axis=(2, 3))[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    ho, wo = win.shape[2], win.shape[3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kernel[0] * kernel[1])


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


def reconstruction_error(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((x @ w.T + b - y) ** 2))
