"""What removing channels costs one layer: its error curve, for the global budget. No ONNX here.

``curve[k]`` is the squared error in the consumer's output once k of the layer's N channels
are removed (k = 0 .. N - 1), divided by the consumer's output energy, so that curves of
different layers are comparable: the error the plan predicts under the layer's activation
model (``activation_model``: BatchNormalization statistics, the white-input kernel model, or
the Gaussian model of the layer's inputs), weighted by the consumer's weights. (Curves measured by greedy elimination on
calibration activations allocated worse on the paper's ResNet-56 than these, and took
minutes: BENCHMARKS.md.)
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
