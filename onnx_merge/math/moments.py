"""Moments of activations under a Gaussian model of the pre-activations.

For pre-activations u ~ N(mean, cov) and a per-channel activation f, the data-free
compensation needs the means E[f(u_i)] and the second moments E[f(u_i) f(u_j)].

Means are 1-D integrals against the normal density, by the trapezoid rule on a fine grid over
[-9, 9] (exponentially accurate for smooth f, O(h^2) across a kink; Gauss-Hermite nodes spend
themselves in the tails and measured 2.6e-3 off the closed-form ReLU mean with 160 of them). Second moments use Mehler's expansion: with
f_i(x) = f(mean_i + std_i x), x standard normal, and h_k the orthonormal Hermite polynomials,

    E[f_i(x) f_j(y)] = sum_k c_ik c_jk rho_ij^k,     c_ik = E[f_i(x) h_k(x)],

for x, y standard normals with correlation rho_ij. Truncated after ORDER terms, every term is a
positive semi-definite matrix (a Hadamard power of a correlation matrix, Schur), and the
diagonal is replaced by the exact E[f_i^2], which adds the non-negative remainder there: the
moment matrix stays PSD whatever the order, so regressions on it stay well posed. Off the
diagonal the remainder is at most |rho|^(ORDER+1) times the tail energy of the coefficients,
which for the kinked activations (ReLU, ReLU6, HardSwish) decays like ORDER^-1.5: a few
tenths of a percent at ORDER 48 even for |rho| near 1. The cost is O(N^2 ORDER).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np

POINTS = 1201  # grid nodes over [-9, 9]: spacing 0.015, ~1e-5 relative across a kink
ORDER = 48  # terms of the Mehler expansion


@lru_cache(maxsize=8)
def normal_quadrature(points: int = POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights with sum_i w_i g(x_i) ~= E[g(x)], x ~ N(0, 1)."""
    x = np.linspace(-9.0, 9.0, points)
    w = np.exp(-0.5 * x * x)
    w[[0, -1]] *= 0.5
    return x, w / w.sum()


def hermite_basis(x: np.ndarray, order: int) -> np.ndarray:
    """(order + 1, len(x)) orthonormal probabilists' Hermite polynomials h_k(x) = He_k(x) / sqrt(k!),
    by the stable three-term recurrence h_{k+1} = (x h_k - sqrt(k) h_{k-1}) / sqrt(k + 1)."""
    h = np.zeros((order + 1, len(x)))
    h[0] = 1.0
    if order >= 1:
        h[1] = x
    for k in range(1, order):
        h[k + 1] = (x * h[k] - np.sqrt(k) * h[k - 1]) / np.sqrt(k + 1)
    return h


def _values(f: Callable, mean: np.ndarray, std: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, w = normal_quadrature(points)
    mean, std = np.asarray(mean, np.float64), np.abs(np.asarray(std, np.float64))
    return f(mean[:, None] + std[:, None] * x[None, :]), x, w


def gaussian_means(f: Callable, mean: np.ndarray, std: np.ndarray, points: int = POINTS) -> np.ndarray:
    """E[f(u)] per channel, u ~ N(mean, std^2)."""
    values, _, w = _values(f, mean, std, points)
    return values @ w


def hermite_coefficients(f: Callable, mean: np.ndarray, std: np.ndarray, order: int = ORDER,
                         points: int = POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(N, order + 1) coefficients c_ik of f_i in the orthonormal Hermite basis, and the exact
    (N,) second moments E[f_i^2] (the sum of all c_ik^2, not only the first order + 1)."""
    values, x, w = _values(f, mean, std, points)
    return (values * w) @ hermite_basis(x, order).T, (values ** 2) @ w


def correlation(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standard deviations and the correlation matrix of ``cov`` (0 where a variance is 0)."""
    cov = np.asarray(cov, np.float64)
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    safe = np.where(std > 0, std, 1.0)
    rho = np.clip(cov / np.outer(safe, safe), -1.0, 1.0)
    rho[std == 0, :] = 0.0
    rho[:, std == 0] = 0.0
    return std, rho


def activation_moments(f: Callable, mean: np.ndarray, cov: np.ndarray, order: int = ORDER,
                       points: int = POINTS) -> np.ndarray:
    """(N + 1, N + 1) second moments of [f(u), 1] for u ~ N(mean, cov): E[f f^T] in the top
    left block, the means E[f(u)] in the last row and column, 1 in the corner."""
    std, rho = correlation(cov)
    c, square = hermite_coefficients(f, mean, std, order, points)
    n = len(std)
    moments = np.zeros((n + 1, n + 1))
    block = moments[:n, :n]
    power = np.ones((n, n))
    for k in range(order + 1):
        block += np.outer(c[:, k], c[:, k]) * power
        power *= rho
    np.fill_diagonal(block, np.maximum(square, np.diag(block)))
    moments[n, :n] = moments[:n, n] = c[:, 0]
    moments[n, n] = 1.0
    return moments
