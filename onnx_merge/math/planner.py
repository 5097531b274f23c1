"""Per-layer planning: from a producer's arrays to a Compensation. No ONNX here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batchnorm import BatchNorm, expected_relu
from .compensation import Compensation
from .criteria import select_kept
from .merge import duplicate_of, merge_by_cosine, merge_through_bn
from .regress import (activation_moments, consumer_metric_root, kernel_moments, preactivation_model, regress_plan,
                      sample_activations)

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
    dense: a Gemm/MatMul layer (its input is one vector, not overlapping patches).
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    bn: BatchNorm | None = None
    consumer_norms: np.ndarray | None = None
    consumer_rows: np.ndarray | None = None
    in_channels: int = 0
    slope: float = 0.0
    dense: bool = False

    @property
    def n(self) -> int:
        return self.weight.shape[0]

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


def regress_applies(arrays: ProducerArrays) -> bool:
    """``regress`` models a layer where a kept BatchNormalization gives its statistics, and a
    fully connected layer without one by the white-input kernel model."""
    return ((arrays.bn is not None or arrays.dense) and arrays.n <= MAX_REGRESS_CHANNELS
            and arrays.consumer_rows is not None)


def ranks_by_criterion(arrays: ProducerArrays, opts: PlanOptions) -> bool:
    """Whether plan_layer keeps the channels the criterion chooses (regress selects its own)."""
    return opts.method != "regress" or not regress_applies(arrays)


def rank_kept(arrays: ProducerArrays, n_keep: int, opts: PlanOptions) -> np.ndarray:
    """The ``n_keep`` channels the criterion keeps (the highest ranked, or merge-cost's set)."""
    # l2-path and merge-cost judge the rows as the merge will see them (BN folded in)
    rows = arrays.folded_rows() if opts.criterion in ("l2-path", "merge-cost") else criterion_rows(arrays)
    return select_kept(rows, n_keep, opts.criterion, arrays.consumer_norms, opts.threshold)


def plan_layer(arrays: ProducerArrays, n_keep: int, opts: PlanOptions, kept: np.ndarray | None = None) -> Compensation:
    """The layer's Compensation. ``kept``, when given, is the criterion's choice made on other
    arrays (the layer as trained); partners and scales always come from ``arrays``."""
    if opts.method == "regress":
        if regress_applies(arrays):
            return plan_regress(arrays, n_keep, opts)
        comp = plan_layer(arrays, n_keep, PlanOptions(**{**vars(opts), "method": "merge"}), kept)
        comp.notes["method"] = "merge"
        comp.notes["fallback"] = ("merged: a convolution without BatchNormalization statistics to model its "
                                  "activations" if arrays.bn is None and not arrays.dense else
                                  f"merged: {arrays.n} channels (regress handles up to {MAX_REGRESS_CHANNELS})")
        return comp
    kept = rank_kept(arrays, n_keep, opts) if kept is None else kept
    if opts.method == "prune":
        return Compensation.prune(arrays.n, kept)
    if arrays.bn is not None and opts.bn_rule == "lambda":
        comp = merge_through_bn(np.asarray(arrays.weight, np.float64), arrays.bn_with_bias(), kept,
                                opts.threshold, opts.lam, opts.scale_rule)
    else:
        comp = merge_by_cosine(arrays.folded_rows(), kept, opts.threshold, opts.scale_rule)
    if opts.bias_from_bn and arrays.bn is not None:
        comp.offset = bn_mean_offset(arrays.bn, comp)
    return comp


def bn_mean_offset(bn: BatchNorm, comp: Compensation) -> np.ndarray:
    """METHOD.md 7: what removed channels carried on average, beyond their merge partner.

    After BN the pre-activation of channel n is ~ N(beta_n, gamma_n^2), so E[relu] is known;
    a removed channel n merged into m with scale s leaves E[relu_n] - s E[relu_m] behind.
    """
    mean_act = expected_relu(bn.beta, bn.gamma)
    offset = np.zeros(comp.n)
    removed = comp.removed
    partner = comp.partner[removed]
    offset[removed] = mean_act[removed]
    merged = partner >= 0
    offset[removed[merged]] -= comp.scale[removed[merged]] * mean_act[comp.kept[partner[merged]]]
    return offset


def activation_gram(arrays: ProducerArrays) -> np.ndarray:
    """(N + 1, N + 1) second moments of the layer's activations with a 1 appended: sampled from
    the Gaussian model that a kept BatchNormalization's statistics give, otherwise the
    white-input kernel model of the rows [w; b] (BN folded in)."""
    if arrays.bn is not None:
        mean, cov = preactivation_model(arrays.weight, arrays.bn, arrays.in_channels or arrays.weight.shape[1])
        return activation_moments(sample_activations(mean, cov, arrays.slope))
    return kernel_moments(arrays.folded_rows(), arrays.slope)


def plan_regress(arrays: ProducerArrays, n_keep: int, opts: PlanOptions) -> Compensation:
    """Gaussian-model regression (``regress.py``); exact positive multiples merged exactly.

    The activations are modelled from a kept BatchNormalization's statistics, or, for a fully
    connected layer without one, by the white-input kernel model. Convolutions without BN are
    not modelled: measured on folded graphs, a white-input model does far worse there than
    cosine merging (their patches overlap and their inputs are far from white).
    """
    rows = arrays.folded_rows()
    gram = activation_gram(arrays)
    # Exact positive multiples add nothing: they leave first, through their representative.
    candidates = np.flatnonzero(duplicate_of(rows) < 0)
    if len(candidates) < n_keep:
        candidates = np.arange(arrays.n)
    comp = regress_plan(gram, n_keep, consumer_metric_root(arrays.consumer_rows), opts.ridge, candidates)
    exact = merge_by_cosine(rows, comp.kept, 1.0 - 1e-6, "exact")
    dup = exact.merged
    if len(dup):  # a channel that is a positive multiple of a kept one: the exact merge, not a fit
        comp.partner[dup], comp.scale[dup] = exact.partner[dup], exact.scale[dup]
        column = np.searchsorted(comp.removed, dup)
        comp.dense[:, column] = 0.0
        comp.offset[dup] = 0.0
    return comp
