"""Data-free multi-neuron compensation from a Gaussian model of the activations.

Each removed channel's activation is expressed by *all* kept ones plus a constant
(``Compensation.dense`` and ``.offset``), fitted by ridge regression on activations sampled
from a model of the layer's pre-activations (the idea behind LBYL, "Leave Before You Leave",
realised by sampling rather than closed-form moments):

- after a BatchNormalization (inference), channel n has mean beta_n and std |gamma_n|; the
  correlations follow from the filters and an input covariance: diagonal per input channel,
  fitted (non-negative least squares) so that Var(F_n . x) matches the BN running variances;
- without BN, a white unit-variance input: mean b, covariance W W^T.

The kept channels are chosen by greedy backward elimination of the consumer's reconstruction
error on those samples (``select_channels``), weighted by the consumer's weights, so a
channel the consumer barely reads goes first. Exact duplicates stay exact: a removed channel
that is a positive multiple of a kept one regresses onto it with zero residual.
"""

from __future__ import annotations

import numpy as np

from .batchnorm import BatchNorm
from .calibrate import LeastSquaresFit, refit, select_channels
from .compensation import Compensation

SAMPLES = 20000


def input_channel_variances(filters: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """s >= 0 per input channel with sum_c s_c |F[n, c, :]|^2 ~= variances[n] (NNLS)."""
    from scipy.optimize import nnls

    energy = np.square(filters, dtype=np.float64).sum(axis=2)  # (N, C)
    s, _ = nnls(energy, np.asarray(variances, np.float64))
    return s


def preactivation_model(weight: np.ndarray, bias: np.ndarray | None, bn: BatchNorm | None,
                        in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (N,) and covariance (N, N) of the pre-activations."""
    w = np.asarray(weight, np.float64)
    n = len(w)
    if bn is None:
        mean = np.zeros(n) if bias is None else np.asarray(bias, np.float64)
        return mean, w @ w.T
    f = w.reshape(n, in_channels, -1)
    s = input_channel_variances(f, bn.var)
    cov_in = np.einsum("ict,c,jct->ij", f, s, f) if s.any() else w @ w.T
    d = np.sqrt(np.maximum(np.diag(cov_in), 1e-30))
    corr = cov_in / np.outer(d, d)
    gamma = np.asarray(bn.gamma, np.float64)
    return np.asarray(bn.beta, np.float64), corr * np.outer(gamma, gamma)


def sample_activations(mean: np.ndarray, cov: np.ndarray, slope: float = 0.0, samples: int = SAMPLES,
                       seed: int = 0) -> np.ndarray:
    """(samples, N) draws of f(z), z ~ N(mean, cov), f a ReLU with negative ``slope``."""
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))
    z = mean + np.random.default_rng(seed).standard_normal((samples, len(mean))) @ root.T
    return np.where(z > 0, z, slope * z)


def consumer_metric_root(consumer_rows: np.ndarray) -> np.ndarray:
    """L with L L^T = V V^T for the consumer's (N, F) rows: errors in activation space
    weighted by how much the consumer reads each channel."""
    v = np.asarray(consumer_rows, np.float64)
    vals, vecs = np.linalg.eigh(v @ v.T)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def regress_plan(acts: np.ndarray, n_keep: int, metric_root: np.ndarray, ridge: float = 1e-3,
                 candidates: np.ndarray | None = None) -> Compensation:
    """Kept channels (among ``candidates``, default all) by consumer-weighted greedy
    elimination; the removed ones regressed on the kept ones plus a constant."""
    n = acts.shape[1]
    candidates = np.arange(n) if candidates is None else np.asarray(candidates)
    fit = LeastSquaresFit(len(candidates), metric_root.shape[1])
    fit.add(acts[:, candidates], acts @ metric_root)
    chosen = select_channels(fit, len(candidates), n_keep, ridge=ridge)
    if chosen is None:
        raise np.linalg.LinAlgError("activation model is ill-conditioned")
    comp = Compensation.prune(n, candidates[chosen[0]])
    removed = comp.removed
    if len(removed):
        target = LeastSquaresFit(len(comp.kept), len(removed))
        target.add(acts[:, comp.kept], acts[:, removed])
        coef, intercept = refit(target, np.arange(len(comp.kept)), len(comp.kept), ridge)
        comp.dense = coef.T
        comp.offset = np.zeros(n)
        comp.offset[removed] = intercept
    return comp
