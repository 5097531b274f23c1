"""Data-free partner selection and scales (METHOD.md section 3).

Every function takes plain arrays: the producer's rows (one flattened output channel per
row, bias appended where the layer has one) and the kept indices, and returns a
:class:`Compensation`.
"""

from __future__ import annotations

import numpy as np

from .batchnorm import BatchNorm, bn_merge_terms
from .compensation import Compensation
from .criteria import dots, row_norms

SCALE_RULES = ("paper", "exact", "projection", "kernel")


def relu_kernel_factor(cos: np.ndarray) -> np.ndarray:
    """E[relu(a) relu(b)] / (E[relu(b)^2] |a|/|b|) for jointly Gaussian a, b with correlation cos.

    From the arc-cosine kernel (Cho and Saul, 2009): E[relu(a) relu(b)] =
    |a||b| (sin t + (pi - t) cos t) / (2 pi), t = arccos(cos). Multiplying the norm ratio by
    it gives the least-squares s in relu(a) ~= s relu(b) under that model: 1 for cos = 1 (so
    exact duplicates stay exact), 1/pi for orthogonal rows, never below the projection.
    """
    c = np.clip(cos, -1.0, 1.0)
    t = np.arccos(c)
    return (np.sin(t) + (np.pi - t) * c) / np.pi


def cosine_to_kept(rows: np.ndarray, kept: np.ndarray, removed: np.ndarray,
                   bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(R, P) cosine similarities of removed rows to kept rows, and all row norms; with ``bias``
    (N,), of the rows [w_n ; b_n], without building them (a copy of a wide layer's weight).

    The product runs in float32 or wider (``dots``: wide layers are the expensive case); norms
    are accumulated in float64.
    """
    rows = np.asarray(rows)
    norms = row_norms(rows)
    products = dots(rows[removed], rows[kept])
    if bias is not None:
        bias = np.asarray(bias, np.float64)
        norms = np.hypot(norms, bias)
        products += np.outer(bias[removed], bias[kept])
    safe = np.where(norms > 0, norms, 1.0)
    return np.clip(products / np.outer(safe[removed], safe[kept]), -1.0, 1.0), norms


def merge_by_cosine(rows: np.ndarray, kept: np.ndarray, threshold: float, scale_rule: str,
                    bias: np.ndarray | None = None) -> Compensation:
    """METHOD.md 3a: each removed row goes to its most similar kept row when cos >= threshold.

    scale_rule "paper"/"exact": s = |u_n| / |u_m| (the paper's norm ratio);
    "projection": s = cos * |u_n| / |u_m| (least-squares fit of u_n by s * u_m);
    "kernel": the norm ratio times relu_kernel_factor(cos) (least-squares fit of the
    activations under a Gaussian input model). All are exact for an exact positive multiple.
    ``bias``: the rows are [w_n ; b_n] (cosine_to_kept).
    """
    comp = Compensation.prune(len(rows), kept)
    removed = comp.removed
    if len(removed) == 0 or len(kept) == 0:
        return comp
    cos, norms = cosine_to_kept(rows, comp.kept, removed, bias)
    best = np.argmax(cos, axis=1)
    best_cos = cos[np.arange(len(removed)), best]
    ok = (best_cos >= threshold) & (best_cos > 0) & (norms[comp.kept][best] > 0)
    ratio = norms[removed] / np.where(norms[comp.kept][best] > 0, norms[comp.kept][best], 1.0)
    factor = {"projection": best_cos, "kernel": relu_kernel_factor(best_cos)}.get(scale_rule, 1.0)
    scale = ratio * factor
    comp.partner[removed[ok]] = best[ok]
    comp.scale[removed[ok]] = scale[ok]
    comp.notes["cosine"] = best_cos
    return comp


def merge_through_bn(
    filters: np.ndarray, bn: BatchNorm, kept: np.ndarray, threshold: float, lam: float, scale_rule: str
) -> Compensation:
    """METHOD.md 3b: merge across an unfolded BatchNormalization.

    The partner minimises lam * (1 - cos) + (1 - lam) * |r| / S (|r| / S normalised by its
    largest value over the candidates) among kept channels with S > 0; the merge happens
    when that partner's cosine is at least ``threshold``. The scale applied is S.
    """
    comp = Compensation.prune(len(filters), kept)
    removed = comp.removed
    if len(removed) == 0:
        return comp
    cos, norms = cosine_to_kept(filters, comp.kept, removed)
    kept_norms = np.where(norms[comp.kept] > 0, norms[comp.kept], np.inf)
    best_cos = np.zeros(len(removed))
    for i, n in enumerate(removed):
        s = norms[n] / kept_norms
        if scale_rule == "projection":
            s = s * np.maximum(cos[i], 0.0)
        elif scale_rule == "kernel":
            s = s * relu_kernel_factor(cos[i])
        big_s, r = bn_merge_terms(bn, n, comp.kept, s, "paper" if scale_rule == "paper" else "exact")
        valid = (big_s > 0) & np.isfinite(big_s)
        if not valid.any():
            continue
        bias_term = np.where(valid, np.abs(r) / np.where(valid, big_s, 1.0), np.inf)
        finite = bias_term[valid]
        bias_term = bias_term / (finite.max() if finite.max() > 0 else 1.0)
        score = np.where(valid, lam * (1.0 - cos[i]) + (1.0 - lam) * bias_term, np.inf)
        p = int(np.argmin(score))
        best_cos[i] = cos[i, p]
        if cos[i, p] >= threshold and cos[i, p] > 0:
            comp.partner[n] = p
            comp.scale[n] = big_s[p]
    comp.notes["cosine"] = best_cos
    return comp


def duplicate_of(rows: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """For each row, the first earlier row it is a positive multiple of (cos >= 1 - tol, loose enough
    for float32 weights), else -1."""
    rows = np.asarray(rows)
    norms = row_norms(rows)
    unit = rows / np.where(norms > 0, norms, 1.0)[:, None]
    cos = dots(unit, unit)
    same = np.tril(cos >= 1.0 - tol, k=-1) & (norms[:, None] > 0) & (norms[None, :] > 0)
    first = np.where(same.any(axis=1), same.argmax(axis=1), -1)
    return first
