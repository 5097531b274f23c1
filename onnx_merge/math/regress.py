"""Data-free multi-neuron compensation from a Gaussian model of the activations.

Each removed channel's activation is expressed by *all* kept ones plus a constant
(``Compensation.dense`` and ``.offset``), fitted by ridge regression on activations sampled
from a model of the layer's pre-activations (the idea behind LBYL, "Leave Before You Leave",
realised by sampling rather than closed-form moments):

after a BatchNormalization (inference), channel n has mean beta_n and std |gamma_n|; the
correlations follow from the filters and an input covariance, diagonal per input channel and
fitted (non-negative least squares) so that Var(F_n . x) matches the BN running variances.

A fully connected layer without BN statistics is modelled in closed form instead
(``kernel_moments``): its input with a constant 1 appended, [x; 1], taken as a white Gaussian
vector, so E[f(u_i . g) f(u_j . g)] is the arc-cosine kernel of the rows u = [w; b] (the model
behind the ``kernel`` merge scale, which is the one-partner case of this fit). The model loses
the sign of the bias, so its means are not trusted: only second moments enter, and no
constant is fitted.

Any other activation (GELU, SiLU, HardSwish, ReLU6, Tanh, ...) is modelled with its means: the
pre-activations u = W x + b of a layer whose input x is Gaussian with a known mean and a
diagonal covariance (``InputModel``: from a LayerNorm or BatchNormalization before the layer,
else white) are N(W mu + b, W diag(var) W^T), or N(beta, ...) after a kept BN, and the moments
of [f(u), 1] come from ``moments.activation_moments``. For these the mean matters (f(u) is not
odd nor homogeneous), so an intercept is fitted: a removed channel's mean goes into the
consumer's bias even where no kept channel explains the rest of it.

The kept channels are chosen by greedy backward elimination of the consumer's reconstruction
error on those samples (``select_channels``), weighted by the consumer's weights, so a
channel the consumer barely reads goes first. Exact duplicates stay exact: a removed channel
that is a positive multiple of a kept one regresses onto it with zero residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import activation
from .batchnorm import BatchNorm
from .calibrate import LeastSquaresFit, refit, select_channels
from .compensation import Compensation
from .merge import relu_kernel_factor
from .moments import activation_moments as gaussian_activation_moments

SAMPLES = 20000


@dataclass
class InputModel:
    """A layer's input as independent Gaussian features: mean and variance per input channel
    (each broadcast over the channel's kernel taps), and where they were read from."""

    mean: np.ndarray
    var: np.ndarray
    source: str = "white"

    @classmethod
    def white(cls, channels: int) -> "InputModel":
        return cls(np.zeros(channels), np.ones(channels), "white")


def layer_preactivations(rows: np.ndarray, bias: np.ndarray | None, inputs: InputModel) -> tuple[np.ndarray, np.ndarray]:
    """Mean (N,) and covariance (N, N) of u = W x + b, x ~ ``inputs``; rows (N, C * taps) are
    channel-major, the layout of Conv weights and of dense rows (taps = 1)."""
    w = np.asarray(rows, np.float64)
    taps = w.shape[1] // len(inputs.mean)
    mean_x, var_x = np.repeat(inputs.mean, taps), np.repeat(inputs.var, taps)
    mean = w @ mean_x + (0.0 if bias is None else np.asarray(bias, np.float64))
    return mean, (w * var_x) @ w.T


def depthwise_preactivations(mean: np.ndarray, cov: np.ndarray, filters: np.ndarray,
                             bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a depthwise conv's outputs, o_c = sum_t k_c[t] a_c(p + t) + b_c, whose
    input a has channel mean ``mean`` and covariance ``cov`` at every position, independently from
    position to position: E[o_c] = m_c sum_t k_c[t] + b_c, Cov(o_c, o_d) = C_cd sum_t k_c[t] k_d[t]
    (only taps at the same position meet). filters: (C, taps)."""
    k = np.asarray(filters, np.float64).reshape(len(mean), -1)
    out = np.asarray(mean, np.float64) * k.sum(axis=1) + (0.0 if bias is None else np.asarray(bias, np.float64))
    return out, np.asarray(cov, np.float64) * (k @ k.T)


def model_moments(name: str, params: dict | None, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """(N + 1, N + 1) moments of [f(u), 1], u ~ N(mean, cov), f the activation ``name``."""
    return gaussian_activation_moments(activation(name, params), mean, cov)


def predicted_error(gram: np.ndarray, comp: Compensation, metric_root: np.ndarray) -> tuple[float, float]:
    """The consumer's expected squared output error under the model, and the same relative to
    the variance of what the layer feeds it: E|V^T (a - a_hat)|^2 and that over tr(V^T Cov(a) V).

    gram: the (N + 1, N + 1) moments of [a, 1]; a_hat: ``comp``'s reconstruction of every
    channel from the kept ones (partner scales, dense coefficients, offsets)."""
    n = len(gram) - 1
    removed = comp.removed
    if not len(removed):
        return 0.0, 0.0
    # residual coefficients over [a, 1] for each removed channel: a_r - sum_p Z[p, r] a_p - c_r
    resid = np.zeros((n + 1, len(removed)))
    resid[removed, np.arange(len(removed))] = 1.0
    resid[comp.kept] -= comp.to_dense()[:, removed]
    if comp.offset is not None:
        resid[n] -= comp.offset[removed]
    weighted = resid @ metric_root[removed]
    error = float(np.einsum("if,ij,jf->", weighted, gram, weighted))
    means = gram[n, :n]
    cov = gram[:n, :n] - np.outer(means, means)
    total = float(np.einsum("if,ij,jf->", metric_root, cov, metric_root))
    return error, error / total if total > 0 else 0.0


def input_channel_variances(filters: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """s >= 0 per input channel with sum_c s_c |F[n, c, :]|^2 ~= variances[n] (NNLS)."""
    from scipy.optimize import nnls

    energy = np.square(filters, dtype=np.float64).sum(axis=2)  # (N, C)
    s, _ = nnls(energy, np.asarray(variances, np.float64))
    return s


def preactivation_model(weight: np.ndarray, bn: BatchNorm, in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (N,) and covariance (N, N) of the pre-activations that ``bn`` normalises."""
    w = np.asarray(weight, np.float64)
    n = len(w)
    f = w.reshape(n, in_channels, -1)
    s = input_channel_variances(f, bn.var)
    scaled = (f * np.sqrt(s)[None, :, None]).reshape(n, -1)
    cov_in = scaled @ scaled.T if s.any() else w @ w.T
    d = np.sqrt(np.maximum(np.diag(cov_in), 1e-30))
    corr = cov_in / np.outer(d, d)
    gamma = np.asarray(bn.gamma, np.float64)
    return np.asarray(bn.beta, np.float64), corr * np.outer(gamma, gamma)


def sample_activations(mean: np.ndarray, cov: np.ndarray, slope: float = 0.0, samples: int = SAMPLES,
                       seed: int = 0) -> np.ndarray:
    """(samples, N) draws of f(z), z ~ N(mean, cov), f a ReLU with negative ``slope``."""
    z = mean + np.random.default_rng(seed).standard_normal((samples, len(mean))) @ psd_root(cov).T
    return np.where(z > 0, z, slope * z)


def psd_root(matrix: np.ndarray) -> np.ndarray:
    """L with L L^T ~= matrix (symmetric PSD): Cholesky with a little jitter, which is
    much cheaper than an eigendecomposition on wide layers."""
    m = (np.asarray(matrix, np.float64) + np.asarray(matrix, np.float64).T) / 2
    jitter = 1e-10 * max(np.trace(m) / max(len(m), 1), 1e-30)
    for _ in range(6):
        try:
            return np.linalg.cholesky(m + jitter * np.eye(len(m)))
        except np.linalg.LinAlgError:
            jitter *= 100
    vals, vecs = np.linalg.eigh(m)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def activation_moments(acts: np.ndarray) -> np.ndarray:
    """(N + 1, N + 1) second moments of [acts, 1] per row: what ``regress_plan`` reads."""
    aug = np.hstack([acts, np.ones((len(acts), 1))])
    return aug.T @ aug / max(len(acts), 1)


def kernel_moments(rows: np.ndarray, slope: float = 0.0) -> np.ndarray:
    """Second moments of f(u_n . g), g ~ N(0, I), for the rows u (N, D), in the layout of
    ``activation_moments`` with zero means (the constant is uncorrelated: no intercept).

    f(z) = relu(z) - slope * relu(-z). For a, b jointly Gaussian with correlation c,
    E[relu(a) relu(b)] = |u_i||u_j| k(c) / 2 with k = ``relu_kernel_factor`` (the arc-cosine
    kernel, Cho and Saul 2009), and E[relu(a) relu(-b)] the same with -c.
    """
    u = np.asarray(rows, np.float64)
    norms = np.linalg.norm(u, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    cos = u @ u.T / np.outer(safe, safe)
    kernel = (1 + slope ** 2) * relu_kernel_factor(cos) - 2 * slope * relu_kernel_factor(-cos)
    n = len(u)
    moments = np.zeros((n + 1, n + 1))
    moments[:n, :n] = np.outer(norms, norms) * kernel / 2
    moments[n, n] = 1.0
    return moments


def consumer_metric_root(consumer_rows: np.ndarray) -> np.ndarray:
    """L with L L^T = V V^T for the consumer's (N, F) rows: errors in activation space
    weighted by how much the consumer reads each channel."""
    v = np.asarray(consumer_rows, np.float64)
    return psd_root(v @ v.T)


def regress_plan(gram: np.ndarray, n_keep: int, metric_root: np.ndarray, ridge: float = 1e-3,
                 candidates: np.ndarray | None = None) -> Compensation:
    """Kept channels (among ``candidates``, default all) by consumer-weighted greedy
    elimination; the removed ones regressed on the kept ones plus a constant.

    gram: (N + 1, N + 1) second moments of the activations with a constant 1 appended
    (``activation_moments`` or ``kernel_moments``): one matrix serves every least-squares
    problem below."""
    n = len(gram) - 1
    candidates = np.arange(n) if candidates is None else np.asarray(candidates)
    ones = n

    def problem(features: np.ndarray, targets: np.ndarray) -> LeastSquaresFit:
        rows = np.r_[features, ones]
        fit = LeastSquaresFit(len(features), targets.shape[1])
        fit.gram, fit.rows = gram[np.ix_(rows, rows)], 1
        fit.cross = targets[rows]
        return fit

    select = problem(candidates, gram[:, :n] @ metric_root)  # targets: acts @ L
    chosen = select_channels(select, len(candidates), n_keep, ridge=ridge)
    if chosen is None:
        raise np.linalg.LinAlgError("activation model is ill-conditioned")
    comp = Compensation.prune(n, candidates[chosen[0]])
    removed = comp.removed
    if len(removed):
        target = problem(comp.kept, gram[:, removed])
        coef, intercept = refit(target, np.arange(len(comp.kept)), len(comp.kept), ridge)
        comp.dense = coef.T
        comp.offset = np.zeros(n)
        comp.offset[removed] = intercept
    return comp
