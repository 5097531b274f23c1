"""BatchNormalization as arrays: folding into the preceding layer, and the merge identity
of METHOD.md section 3b."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BatchNorm:
    """y = gamma * (z - mean) / sqrt(var + eps) + beta, per channel."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float = 1e-5

    @property
    def sigma(self) -> np.ndarray:
        return np.sqrt(np.asarray(self.var, np.float64) + self.eps)

    @property
    def multiplier(self) -> np.ndarray:
        return np.asarray(self.gamma, np.float64) / self.sigma

    def fold(self, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Weights and bias of one layer equal to (layer followed by this BN).

        ``weight`` has the output channel on axis 0.
        """
        k = self.multiplier
        b = np.zeros(len(k)) if bias is None else np.asarray(bias, np.float64)
        w = np.asarray(weight, np.float64) * k.reshape((-1,) + (1,) * (weight.ndim - 1))
        return w.astype(weight.dtype), (self.beta + k * (b - self.mean)).astype(weight.dtype)

    def take(self, index: np.ndarray) -> "BatchNorm":
        return BatchNorm(self.gamma[index], self.beta[index], self.mean[index], self.var[index], self.eps)


def bn_merge_terms(bn: BatchNorm, n: int, m: np.ndarray, s: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale S and residual r with BN_n(F_n x) ~= S * BN_m(F_m x) + r, given F_n ~= s F_m.

    ``m`` and ``s`` are arrays of candidate partners and filter scales for channel ``n``.
    rule "exact" is METHOD.md's S; rule "paper" is the formula in the authors' released
    code, S = s * (gamma_m / gamma_n) * (var_n / var_m), kept only to reproduce their figures.
    The residual uses the same expression for both rules.
    """
    g, beta, mu, var, sig = (np.asarray(a, np.float64) for a in (bn.gamma, bn.beta, bn.mean, bn.var, bn.sigma))
    if rule == "paper":
        big_s = s * (g[m] / g[n]) * (var[n] / var[m])
    else:
        big_s = s * (g[n] / g[m]) * (sig[m] / sig[n])
    r = beta[n] - big_s * beta[m] + (g[n] / sig[n]) * (s * mu[m] - mu[n])
    return big_s, r


def expected_relu(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(z, 0)] for z ~ N(mean, std^2): mean * Phi(mean/std) + std * phi(mean/std)."""
    from math import erf, sqrt

    mean, std = np.asarray(mean, np.float64), np.maximum(np.abs(np.asarray(std, np.float64)), 1e-12)
    t = mean / std
    cdf = 0.5 * (1.0 + np.vectorize(erf)(t / sqrt(2.0)))
    pdf = np.exp(-0.5 * t * t) / sqrt(2.0 * np.pi)
    return mean * cdf + std * pdf
