"""What removing channels costs one layer: its error curve, for the global budget. No ONNX here.

Two kinds of curve, ``curve[k]`` after removing k of the layer's N channels (k = 0 .. N - 1):

- measured (the default; run by allocation.OutputProbe): the plan's rebuilt channels
  (``reconstruction``: a_hat = A a + c) fed into the model in place of the layer's activations,
  and the change in the model's outputs (``output_change``) at a few counts (``probe_counts``),
  linear between (``measured_curve``). Every layer is then rated in the same units. Data-free,
  the inputs are ``synthetic.synthetic_inputs``.
- predicted (``planned_curve``; --sensitivity consumer): the squared error in the consumer's
  output, divided by the consumer's output energy, under the layer's activation model
  (``activation_model``: BatchNormalization statistics, the white-input kernel model, or the
  Gaussian model of the layer's inputs), weighted by the consumer's weights. Relative to the
  consumer, not to what the network computes: on residual networks it misjudges the blocks
  whose branch carries most of their stream (the downsampling blocks), BENCHMARKS.md.

With calibration the consumer is refitted on the layer's measured activations rather than
compensated by the data-free plan, so a measured curve rebuilds the channels as that refit sees
them (``measured_moments``, then ``regress_plan`` on them): the removed channels regressed on
the kept ones in the calibration activations' own statistics.
"""

from __future__ import annotations

import numpy as np

from .calibrate import LeastSquaresFit, eliminate
from .compensation import Compensation
from .merge import duplicate_of
from .planner import PlanOptions, ProducerArrays, activation_model, plan_layer, regress_applies
from .regress import consumer_metric_root, moment_problem

MAX_PLANNED_POINTS = 48  # a wider layer is planned at this many counts, the curve interpolated between


def output_energy(gram: np.ndarray, metric: np.ndarray) -> float:
    """E |V^T a|^2: the consumer's output energy from this input (metric = V V^T, N x N)."""
    n = len(metric)
    return float(np.sum(metric * gram[:n, :n]))


def plan_error(gram: np.ndarray, metric: np.ndarray, comp: Compensation) -> float:
    """E |V^T (a - a_hat)|^2 for the plan's reconstruction a_hat = Z^T a_kept + c of the
    activations a, whose second moments with a 1 appended are ``gram``."""
    n = comp.n
    residual = np.zeros((n, n + 1))  # a - a_hat = residual @ [a; 1]
    residual[:, :n] = np.eye(n)
    residual[:, comp.kept] -= comp.to_dense().T
    if comp.offset is not None:
        residual[:, n] -= comp.offset
    return float(np.sum(metric * (residual @ gram @ residual.T)))


def elimination_curve(fit: LeastSquaresFit, channels: int, ridge: float, free: int = 0) -> np.ndarray | None:
    """Cumulative error of greedy elimination down to one channel, ``free`` removals that cost
    nothing first (length free + channels); None when ill-conditioned."""
    result = eliminate(fit, channels, 1, ridge)
    if result is None:
        return None
    return np.r_[np.zeros(free + 1), np.cumsum(result[1])]


def planned_curve(arrays: ProducerArrays, opts: PlanOptions) -> np.ndarray:
    """The data-free curve of one layer under the plan ``opts`` describes.

    ``regress`` chooses by greedy elimination, so one elimination gives every count's error
    (exact positive multiples leave first, for free, as the plan does). Other plans keep the
    criterion's channels; they are planned at up to MAX_PLANNED_POINTS counts.
    """
    if arrays.consumer_rows is None:
        raise ValueError("a layer's curve needs the consumer's rows")
    n = arrays.n
    gram = activation_model(arrays)[0]
    metric = np.asarray(arrays.consumer_rows, np.float64)
    metric = metric @ metric.T
    energy = max(output_energy(gram, metric), 1e-30)
    if opts.method == "regress" and regress_applies(arrays):
        candidates = (np.flatnonzero(duplicate_of(arrays.folded_rows()) < 0) if arrays.homogeneous
                      else np.arange(n))
        select = moment_problem(gram, candidates, gram[:, :n] @ consumer_metric_root(arrays.consumer_rows))
        curve = elimination_curve(select, len(candidates), opts.ridge, free=n - len(candidates))
        if curve is not None:
            return curve / energy
        opts = PlanOptions(**{**vars(opts), "method": "merge"})  # ill-conditioned model: as plan_layer's fallback
    counts = np.arange(n) if n <= MAX_PLANNED_POINTS else np.unique(
        np.linspace(0, n - 1, MAX_PLANNED_POINTS).round().astype(int))
    errors = [0.0 if k == 0 else plan_error(gram, metric, plan_layer(arrays, n - k, opts)) for k in counts]
    return np.interp(np.arange(n), counts, errors) / energy


def measured_moments(acts: np.ndarray, axis: int) -> np.ndarray:
    """(N + 1, N + 1) mean second moments of [a, 1] over every sample and position of ``acts``,
    whose channels lie on ``axis``: what ``regress_plan`` takes in place of a modelled gram."""
    a = np.moveaxis(np.asarray(acts, np.float64), axis, -1).reshape(-1, acts.shape[axis])
    a = np.hstack([a, np.ones((len(a), 1))])
    return a.T @ a / max(len(a), 1)


def reconstruction(comp: Compensation) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with a_hat = A a + c: what the consumer reads once the plan ``comp`` is applied
    (the removed channels rebuilt from the kept ones; A is N x N, zero on removed columns)."""
    n = comp.n
    a = np.zeros((n, n))
    a[:, comp.kept] = comp.to_dense().T
    c = np.zeros(n) if comp.offset is None else np.asarray(comp.offset, np.float64)
    return a, c


def probe_counts(n: int, points: int) -> np.ndarray:
    """Removed-channel counts a measured curve is sampled at: 0, then up to ``points`` counts
    spread evenly up to n - 1."""
    return np.unique(np.linspace(0, n - 1, points + 1).round().astype(int))


def output_change(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """sum over the model's outputs of E|y_hat - y|^2 / E|y - E y|^2: the change an edit makes
    to what the model computes, relative to how much the outputs vary between samples (a
    constant part of the logits carries no decision)."""
    total = 0.0
    for y_hat, y in zip(outputs, reference):
        y = np.asarray(y, np.float64).reshape(len(y), -1)
        spread = np.sum((y - y.mean(axis=0)) ** 2)
        total += float(np.sum((np.asarray(y_hat, np.float64).reshape(len(y), -1) - y) ** 2) / max(spread, 1e-30))
    return total


def measured_curve(counts: np.ndarray, errors: np.ndarray, n: int) -> np.ndarray:
    """A curve of length n from errors measured at ``counts`` (counts[0] = 0), linear between."""
    return np.interp(np.arange(n), counts, errors)
