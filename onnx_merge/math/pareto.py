"""The Pareto frontier of a sweep: configurations no other one beats on both cost and score."""

from __future__ import annotations

import numpy as np


def pareto_front(cost, score) -> np.ndarray:
    """Mask of the points that no other point dominates (cost as low or lower and score as high or
    higher, one of them strictly). Lower cost and higher score are better; NaN points are never on it."""
    cost, score = np.asarray(cost, float), np.asarray(score, float)
    valid = ~(np.isnan(cost) | np.isnan(score))
    c, s = cost[:, None], score[:, None]
    dominated = ((cost <= c) & (score >= s) & ((cost < c) | (score > s)) & valid).any(axis=1)
    return valid & ~dominated
