"""Block refinement of a fully connected chain on calibration data (after the least-squares fit).

The least-squares refit moves only the consumer, so it cannot make the kept neurons any better
at standing in for the removed ones. Refinement fits both layers of the block

    y = W2 f(W1 x + b1) + b2,        f = ReLU (or LeakyReLU with slope a), or any activation
                                      (GELU, SiLU, ...: its derivative by central differences)

to the original output t on the calibration rows, starting from the fitted block theta0:

    minimise  |y - t|^2 / (n mean(t^2))  +  lam |theta - theta0|^2 / (|theta| mean(theta0^2))

with L-BFGS (for a ReLU the loss is piecewise quadratic). The proximal term keeps the block near what
the closed-form steps produced, so a few hundred rows do not overfit; its strength lam is
chosen by holding out a quarter of the rows, and the refined block is used only when it beats
the starting block on those held-out rows. No labels and no ONNX here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

STRENGTHS = (0.1, 1.0, 10.0)


@dataclass
class DenseBlock:
    """Producer (w1 (P, F), b1 (P,)) -> activation -> consumer (w2 (M, P), b2 (M,)). The
    activation is ``fn`` where given (math/activations.py), else the ReLU with ``slope``."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    slope: float = 0.0
    fn: Callable[[np.ndarray], np.ndarray] | None = None

    def act(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """f(z) and f'(z)."""
        if self.fn is None:
            gate = np.where(z > 0, 1.0, self.slope)
            return z * gate, gate
        h = 1e-4 * (1.0 + np.abs(z))
        return self.fn(z), (self.fn(z + h) - self.fn(z - h)) / (2.0 * h)

    def flat(self) -> np.ndarray:
        return np.concatenate([self.w1.ravel(), self.b1, self.w2.ravel(), self.b2])

    def with_flat(self, theta: np.ndarray) -> "DenseBlock":
        parts, at = [], 0
        for like in (self.w1, self.b1, self.w2, self.b2):
            parts.append(theta[at:at + like.size].reshape(like.shape))
            at += like.size
        return DenseBlock(*parts, slope=self.slope, fn=self.fn)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.w1.T + self.b1
        h = np.where(z > 0, z, self.slope * z) if self.fn is None else self.fn(z)
        return h @ self.w2.T + self.b2


def block_error(block: DenseBlock, x: np.ndarray, target: np.ndarray) -> float:
    """Mean squared error of the block's output on the rows."""
    return float(np.mean((block(x) - target) ** 2))


def loss_and_gradient(theta: np.ndarray, start: DenseBlock, x: np.ndarray, target: np.ndarray,
                      strength: float, theta0: np.ndarray) -> tuple[float, np.ndarray]:
    """The refinement objective (module docstring) and its gradient in theta."""
    b = start.with_flat(theta)
    z = x @ b.w1.T + b.b1
    h, gate = b.act(z)
    err = h @ b.w2.T + b.b2 - target
    norm = len(x) * max(float(np.mean(target ** 2)), 1e-30)
    g_out = 2.0 * err / norm
    g_z = (g_out @ b.w2) * gate
    grad = np.concatenate([(g_z.T @ x).ravel(), g_z.sum(0), (g_out.T @ h).ravel(), g_out.sum(0)])
    step = theta - theta0
    prox = strength / (len(theta) * max(float(np.mean(theta0 ** 2)), 1e-30))
    return float(np.sum(err ** 2) / norm + prox * (step @ step)), grad + 2.0 * prox * step


def fit_block(start: DenseBlock, x: np.ndarray, target: np.ndarray, strength: float, iterations: int) -> DenseBlock:
    theta0 = start.flat()
    result = minimize(loss_and_gradient, theta0, args=(start, x, target, strength, theta0), jac=True,
                      method="L-BFGS-B", options={"maxiter": iterations})
    return start.with_flat(result.x)


def refine_block(start: DenseBlock, x: np.ndarray, target: np.ndarray, iterations: int = 100,
                 strengths=STRENGTHS, holdout: float = 0.25, seed: int = 0) -> tuple[DenseBlock, dict] | None:
    """The refined block and what was measured, or None when no strength beats ``start`` on
    the held-out rows (the block is then left as it is)."""
    x, target = np.asarray(x, np.float64), np.asarray(target, np.float64)
    order = np.random.default_rng(seed).permutation(len(x))
    held, fitted = order[:int(len(x) * holdout)], order[int(len(x) * holdout):]
    if len(held) == 0 or len(fitted) == 0:
        return None
    baseline = block_error(start, x[held], target[held])
    scores = {s: block_error(fit_block(start, x[fitted], target[fitted], s, iterations), x[held], target[held])
              for s in strengths}
    strength = min(scores, key=scores.get)
    if not scores[strength] < baseline:
        return None
    refined = fit_block(start, x, target, strength, iterations)
    return refined, {"strength": strength, "held_out_error": (baseline, scores[strength])}
