"""Which neurons to keep: per-layer counts and ranking criteria (METHOD.md section 2)."""

from __future__ import annotations

import math

import numpy as np

CRITERIA = ("l1-norm", "l2-norm", "l2-GM", "l2-path")


def keep_count(n: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept out of ``n`` at pruning ``ratio``: floor(n * (1 - ratio)), at least 1.

    The product is rounded to 9 decimals first so that float error cannot drop a channel
    (100 * (1 - 0.8) is 19.999999999999996 in binary floating point, and must keep 20).
    With ``round_to`` > 1 the count is rounded up to a multiple of it (never above ``n``).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    kept = max(1, math.floor(round(n * (1.0 - ratio), 9)))
    if round_to > 1 and kept < n:
        kept = min(n, math.ceil(kept / round_to) * round_to)
    return kept


def importance(rows: np.ndarray, criterion: str, consumer_norms: np.ndarray | None = None) -> np.ndarray:
    """One score per row of ``rows`` (N x D); higher means more worth keeping.

    "l2-path" is |u_n| * |V[:, n]| with V the consumer's weights (``consumer_norms``): a
    ReLU network is unchanged when a channel's row is scaled by c and its consumer column by
    1/c, and this score is the one of the three norms that does not move under that.
    """
    rows = np.asarray(rows)
    if criterion == "l2-path":
        if consumer_norms is None:
            raise ValueError("l2-path needs the consumer's column norms")
        return row_norms(rows) * np.asarray(consumer_norms, np.float64)
    if criterion == "l1-norm":
        return np.concatenate([np.abs(c).sum(axis=1, dtype=np.float64) for c in _chunks(rows)])
    if criterion == "l2-norm":
        return row_norms(rows)
    if criterion == "l2-GM":
        # FPGM: a row close to the geometric median is replaceable by the others, so the
        # summed distance to all rows is its importance.
        sq = row_norms(rows) ** 2
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (rows @ rows.T).astype(np.float64), 0.0)
        return np.sqrt(d2).sum(axis=1)
    raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")


def _chunks(rows: np.ndarray, size: int = 256):
    """Row blocks, so that temporaries stay small on wide layers."""
    return [rows[i:i + size] for i in range(0, max(len(rows), 1), size)] if len(rows) else [rows]


def row_norms(rows: np.ndarray) -> np.ndarray:
    """L2 norm of each row, accumulated in float64 block by block."""
    return np.sqrt(np.concatenate([np.einsum("nd,nd->n", c, c, dtype=np.float64) if c.dtype == np.float64 else
                                   np.square(c, dtype=np.float64).sum(axis=1) for c in _chunks(rows)]))


def select_kept(rows: np.ndarray, n_keep: int, criterion: str, consumer_norms: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the ``n_keep`` most important rows (ties: lower index wins)."""
    scores = importance(rows, criterion, consumer_norms)
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n_keep])
