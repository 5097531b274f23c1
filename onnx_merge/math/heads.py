"""Attention heads: which to keep, and what a removed head leaves behind. Arrays only.

Head h's contribution to the attention block's output is P_h (X W_V,h + 1 b_V,h) W_O,h, with
P_h a row-stochastic matrix (softmax rows sum to 1). Its size, with nothing known about the
inputs, is that of W_V,h W_O,h (a C_in x C_out map of rank d); its bias part 1 b_V,h W_O,h does
not depend on the input at all, so it can be kept exactly in the output bias.
"""

from __future__ import annotations

import numpy as np

from .criteria import keep_count


def head_importance(v_weights: list[np.ndarray], o_weights: list[np.ndarray]) -> np.ndarray:
    """||W_V,h W_O,h||_F per head: v_weights[h] (C_in, d), o_weights[h] (d, C_out)."""
    return np.array([np.linalg.norm(v.astype(np.float64) @ o.astype(np.float64)) for v, o in zip(v_weights, o_weights)])


def kept_heads(importance: np.ndarray, ratio: float) -> np.ndarray:
    """Indices (ascending) of the heads kept at ``ratio``: the floor(H (1 - ratio)) largest, at
    least one; ties keep the earlier head."""
    n_keep = keep_count(len(importance), ratio)
    order = np.argsort(-np.asarray(importance, dtype=np.float64), kind="stable")
    return np.sort(order[:n_keep])


def value_bias_offset(v_biases: list[np.ndarray], o_weights: list[np.ndarray]) -> np.ndarray:
    """sum over removed heads of b_V,h W_O,h: the constant the output projection must add to
    keep what those heads' value bias gave every token."""
    return sum((b.astype(np.float64) @ o.astype(np.float64) for b, o in zip(v_biases, o_weights)),
               np.zeros(o_weights[0].shape[1]))
