"""Per-layer planning: from a producer's arrays to a Compensation. No ONNX here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import FUNCTIONS, HOMOGENEOUS, activation, relu_slope
from .batchnorm import BatchNorm, expected_relu
from .compensation import Compensation
from .criteria import importance, select_kept
from .merge import duplicate_of, merge_by_cosine, merge_through_bn
from .moments import gaussian_means
from .regress import (InputModel, activation_moments, consumer_metric_root, kernel_moments, layer_preactivations,
                      model_moments, predicted_error, preactivation_model, regress_plan, sample_activations)

MAX_REGRESS_CHANNELS = 2048  # wider layers fall back to cosine merging (an N x N model each)

BN_RULES = ("fold", "lambda")


@dataclass
class ProducerArrays:
    """What a producer computes, per output channel.

    weight: (N, D) effective weight rows (Gemm alpha applied); bias: (N,) or None (Gemm beta
    applied); bn: the BatchNormalization that follows, if it was kept in the graph;
    consumer_norms: (N,) L2 norm of the consumer's weights over each input channel;
    consumer_rows: (N, F) the consumer's weights per input channel (for ``regress``);
    in_channels: input channels of the producer (rows are (in_channels, taps) flattened);
    slope: the negative slope of the activation (0 for ReLU);
    dense: a Gemm/MatMul layer (its input is one vector, not overlapping patches);
    activation: the activation by name and parameters (``activations.FUNCTIONS``); None for the
    ReLU family given by ``slope``;
    inputs: what the graph tells about the layer's input (a LayerNorm or BN before it), if anything.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    bn: BatchNorm | None = None
    consumer_norms: np.ndarray | None = None
    consumer_rows: np.ndarray | None = None
    in_channels: int = 0
    slope: float = 0.0
    dense: bool = False
    activation: tuple[str, dict] | None = None
    inputs: InputModel | None = None

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def act(self) -> tuple[str, dict]:
        if self.activation is not None:
            return self.activation
        return ("relu", {}) if self.slope == 0 else ("leaky_relu", {"alpha": self.slope})

    @property
    def pointwise(self) -> bool:
        """A fully connected layer, or a 1x1 convolution (the same layer at every position)."""
        return self.dense or (self.in_channels > 0 and self.weight.shape[1] == self.in_channels)

    @property
    def homogeneous(self) -> bool:
        """Whether merging commutes with the activation (METHOD.md section 1)."""
        return self.act[0] in HOMOGENEOUS

    def rows(self) -> np.ndarray:
        """[w_n ; b_n]: the layer's own rows with its bias appended (METHOD.md 3a), in the
        weights' dtype; built once."""
        if self.bias is None:
            return self.weight
        if getattr(self, "_rows", None) is None:
            self._rows = np.hstack([self.weight, np.asarray(self.bias, self.weight.dtype)[:, None]])
        return self._rows

    def folded_rows(self) -> np.ndarray:
        """Rows of the layer with the BatchNormalization folded in (equal to rows() without BN)."""
        if self.bn is None:
            return self.rows()
        w, b = self.bn.fold(self.weight, self.bias)
        return np.hstack([w, b[:, None]])

    def bn_with_bias(self) -> BatchNorm:
        """The BN with the producer's own bias moved into its mean, so filters carry no bias."""
        bn = self.bn
        mean = bn.mean if self.bias is None else bn.mean - self.bias
        return BatchNorm(bn.gamma, bn.beta, mean, bn.var, bn.eps)


@dataclass
class PlanOptions:
    method: str = "merge"
    criterion: str = "l1-norm"
    threshold: float = 0.1
    lam: float = 0.85
    scale_rule: str = "projection"
    bn_rule: str = "fold"
    bias_from_bn: bool = False
    ridge: float = 1e-3


def criterion_rows(arrays: ProducerArrays) -> np.ndarray:
    """Rows ranked by the criterion: the layer's own weights, bias included only without BN."""
    return arrays.weight if arrays.bn is not None else arrays.rows()


def models_activations(arrays: ProducerArrays) -> bool:
    """Whether ``regress`` has a model of the layer's activations: a kept BatchNormalization's
    statistics, the statistics of its input that the graph gives (a LayerNorm or BN before it),
    or a white input for a fully connected or 1x1 layer; and a named activation, at most
    MAX_REGRESS_CHANNELS wide."""
    return ((arrays.bn is not None or arrays.pointwise or arrays.inputs is not None)
            and arrays.n <= MAX_REGRESS_CHANNELS and arrays.act[0] in FUNCTIONS)


def regress_applies(arrays: ProducerArrays) -> bool:
    """``regress`` runs where it models the activations and has the consumer's rows."""
    return models_activations(arrays) and arrays.consumer_rows is not None


def ranks_by_criterion(arrays: ProducerArrays, opts: PlanOptions) -> bool:
    """Whether plan_layer keeps the channels the criterion chooses (regress selects its own)."""
    return opts.method != "regress" or not regress_applies(arrays)


def rank_kept(arrays: ProducerArrays, n_keep: int, opts: PlanOptions) -> np.ndarray:
    """The ``n_keep`` channels the criterion keeps (the highest ranked, or merge-cost's set)."""
    if opts.criterion in ("l1-norm", "l2-norm", "l2-path") and arrays.bn is None and arrays.bias is not None:
        # [w_n ; b_n] scored without building it: on a wide layer that is a copy of the weight
        scores = importance(arrays.weight, opts.criterion, arrays.consumer_norms)
        bias = np.abs(np.asarray(arrays.bias, np.float64))
        if opts.criterion == "l1-norm":
            scores = scores + bias
        else:
            scale = 1.0 if opts.criterion == "l2-norm" else np.asarray(arrays.consumer_norms, np.float64)
            scores = np.hypot(scores, bias * scale)
        return np.sort(np.argsort(-scores, kind="stable")[:n_keep])
    # l2-path and merge-cost judge the rows as the merge will see them (BN folded in)
    rows = arrays.folded_rows() if opts.criterion in ("l2-path", "merge-cost") else criterion_rows(arrays)
    return select_kept(rows, n_keep, opts.criterion, arrays.consumer_norms, opts.threshold)


def plan_layer(arrays: ProducerArrays, n_keep: int, opts: PlanOptions, kept: np.ndarray | None = None) -> Compensation:
    """The layer's Compensation. ``kept``, when given, is the criterion's choice made on other
    arrays (the layer as trained); partners and scales always come from ``arrays``."""
    if opts.method == "regress":
        if regress_applies(arrays):
            try:
                return plan_regress(arrays, n_keep, opts)
            except np.linalg.LinAlgError:  # e.g. weights whose statistics are garbage
                reason = "the activation model is ill-conditioned"
        elif arrays.bn is None and not arrays.pointwise:
            reason = "a convolution without statistics (BatchNormalization, or its input's) to model its activations"
        else:
            reason = f"{arrays.n} channels (regress handles up to {MAX_REGRESS_CHANNELS})"
        # merging needs a homogeneous activation; otherwise prune, with BN's means where they exist
        method = "merge" if arrays.homogeneous else "prune"
        comp = plan_layer(arrays, n_keep, PlanOptions(**{**vars(opts), "method": method,
                                                         "bias_from_bn": opts.bias_from_bn or method == "prune"}), kept)
        comp.notes["method"] = method
        comp.notes["fallback"] = f"{method}d: {reason}"
        return comp
    kept = rank_kept(arrays, n_keep, opts) if kept is None else kept
    if opts.method == "prune":
        comp = Compensation.prune(arrays.n, kept)
        if opts.bias_from_bn and arrays.bn is not None:
            comp.offset = bn_mean_offset(arrays.bn, comp, arrays.act)
        return comp
    if arrays.bn is not None and opts.bn_rule == "lambda":
        comp = merge_through_bn(np.asarray(arrays.weight, np.float64), arrays.bn_with_bias(), kept,
                                opts.threshold, opts.lam, opts.scale_rule)
    else:
        if arrays.bn is None:  # the rows are [w ; b]: handed over in parts, never built
            comp = merge_by_cosine(arrays.weight, kept, opts.threshold, opts.scale_rule, arrays.bias)
        else:
            comp = merge_by_cosine(arrays.folded_rows(), kept, opts.threshold, opts.scale_rule)
    if opts.bias_from_bn and arrays.bn is not None:
        comp.offset = bn_mean_offset(arrays.bn, comp, arrays.act)
    return comp


def bn_mean_offset(bn: BatchNorm, comp: Compensation, act: tuple[str, dict] = ("relu", {})) -> np.ndarray:
    """METHOD.md 7: what removed channels carried on average, beyond their merge partner.

    After BN the pre-activation of channel n is ~ N(beta_n, gamma_n^2), so E[f] is known (closed
    form for ReLU, quadrature otherwise); a removed channel n merged into m with scale s leaves
    E[f_n] - s E[f_m] behind.
    """
    if act[0] == "relu":
        mean_act = expected_relu(bn.beta, bn.gamma)
    else:
        mean_act = gaussian_means(activation(*act), bn.beta, bn.gamma)
    offset = np.zeros(comp.n)
    removed = comp.removed
    partner = comp.partner[removed]
    offset[removed] = mean_act[removed]
    merged = partner >= 0
    offset[removed[merged]] -= comp.scale[removed[merged]] * mean_act[comp.kept[partner[merged]]]
    return offset


def activation_model(arrays: ProducerArrays) -> tuple[np.ndarray, str]:
    """(N + 1, N + 1) moments of [f(u), 1] for the layer's activations, and the model's name.

    The ReLU family keeps the models measured on LeNet and ResNet-56: after a BN, samples of its
    statistics; a fully connected layer without one, the white-input kernel model (zero means).
    Every other activation, and any layer whose input the graph describes, gets the Gaussian
    pre-activation model with its means (``regress.py``).
    """
    name, params = arrays.act
    slope = relu_slope(name, params)
    if arrays.bn is not None:
        mean, cov = preactivation_model(arrays.weight, arrays.bn, arrays.in_channels or arrays.weight.shape[1])
        if slope is not None:
            return activation_moments(sample_activations(mean, cov, slope)), "batchnorm"
        return model_moments(name, params, mean, cov), "batchnorm"
    if slope is not None and arrays.inputs is None:
        return kernel_moments(arrays.folded_rows(), slope), "white kernel"
    inputs = arrays.inputs or InputModel.white(arrays.in_channels or arrays.weight.shape[1])
    mean, cov = layer_preactivations(arrays.weight, arrays.bias, inputs)
    return model_moments(name, params, mean, cov), inputs.source


def plan_regress(arrays: ProducerArrays, n_keep: int, opts: PlanOptions) -> Compensation:
    """Gaussian-model regression (``regress.py``); exact positive multiples merged exactly.

    ``notes["predicted_error"]`` is the plan's output error under the model relative to what the
    layer feeds its consumer.
    """
    rows = arrays.folded_rows()
    gram, source = activation_model(arrays)
    metric = consumer_metric_root(arrays.consumer_rows)
    # Exact positive multiples add nothing (through a homogeneous activation): they leave first,
    # through their representative.
    candidates = np.flatnonzero(duplicate_of(rows) < 0) if arrays.homogeneous else np.arange(arrays.n)
    if len(candidates) < n_keep:
        candidates = np.arange(arrays.n)
    comp = regress_plan(gram, n_keep, metric, opts.ridge, candidates)
    if arrays.homogeneous:
        exact = merge_by_cosine(rows, comp.kept, 1.0 - 1e-6, "exact")
        dup = exact.merged
        if len(dup):  # a channel that is a positive multiple of a kept one: the exact merge, not a fit
            comp.partner[dup], comp.scale[dup] = exact.partner[dup], exact.scale[dup]
            column = np.searchsorted(comp.removed, dup)
            comp.dense[:, column] = 0.0
            comp.offset[dup] = 0.0
    comp.notes["predicted_error"] = predicted_error(gram, comp, metric)[1]
    comp.notes["model"] = source
    return comp
