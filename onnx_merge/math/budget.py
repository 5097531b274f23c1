"""Where a global budget goes: channel counts per layer that meet a saving at the least cost.

Each group (a layer whose output channels can be removed) has a cost curve (``cost[k]``
after removing k of its channels, math/sensitivity.py). What the model spends (MACs or
parameters) is a sum of terms, each scaling with the kept fraction of up to two groups: a
layer's weight shrinks with its own output channels and with its input channels, which may
be another group's (LeNet's middle layer loses rows to one group and columns to another).
Greedy: the group whose next removals cost least per unit saved gives up its next channel
(or ``round_to`` of them), until the saving is met, so it overshoots by less than one step of
one group. A cost curve need not be convex: a group is ranked by the cheapest average rate
over any of its further counts, not only the next one, so a dear first channel does not hide
cheap ones behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class BudgetGroup:
    """``cost`` (N,): the curve; ``keep``: a pinned channel count (None: the allocation chooses)."""

    cost: np.ndarray
    keep: int | None = None
    step: int = 1  # kept counts are multiples of it (besides the full width) ...
    floor: int = 1  # ... and at least this many

    @property
    def channels(self) -> int:
        return len(self.cost)


@dataclass
class BudgetTerm:
    """Part of the spend: ``size`` at full width, times the kept fraction of each of ``groups``."""

    size: float
    groups: tuple[int, ...]


class BudgetUnreachable(ValueError):
    """Even removing every channel allowed does not save enough; ``saved`` says how much it saves."""

    def __init__(self, need: float, saved: float):
        super().__init__(f"removing every channel allowed saves {saved:g}, {need:g} needed")
        self.need, self.saved = need, saved


def allowed_counts(n: int, round_to: int = 1, floor: int = 1) -> np.ndarray:
    """Channel counts a group of n may keep, descending: n, then multiples of ``round_to`` below
    it, down to ``floor`` (at least one channel; keep_count never rounds below a multiple)."""
    counts = np.r_[n, np.arange((n - 1) // round_to * round_to, 0, -round_to)].astype(np.int64)
    return counts[(counts >= floor) | (counts == n)]


def spend(terms: list[BudgetTerm], groups: list[BudgetGroup], keeps: list[int]) -> float:
    """What the terms spend with ``keeps`` channels kept per group."""
    return float(sum(t.size * np.prod([keeps[g] / groups[g].channels for g in t.groups]) for t in terms))


def per_channel(terms: list[BudgetTerm], groups: list[BudgetGroup], keeps: list[int], i: int) -> float:
    """What one channel of group i saves, the other groups at ``keeps``."""
    return float(sum(t.size / groups[i].channels * np.prod([keeps[g] / groups[g].channels for g in t.groups if g != i])
                     for t in terms if i in t.groups))


def allocate(groups: list[BudgetGroup], terms: list[BudgetTerm], need: float, round_to: int = 1) -> list[int]:
    """Kept channels per group so that the terms spend at least ``need`` less than at full width."""
    full = [g.channels for g in groups]
    keeps = [g.channels if g.keep is None else g.keep for g in groups]
    counts = [allowed_counts(g.channels, math.lcm(round_to, g.step), g.floor) if g.keep is None else np.array([g.keep]) for g in groups]
    costs = [np.maximum.accumulate(np.asarray(g.cost, np.float64)) for g in groups]  # more removed never costs less
    position = [0] * len(groups)
    start = spend(terms, groups, full)

    def rate(i: int) -> float:
        ahead = counts[i][position[i] + 1:]
        unit = per_channel(terms, groups, keeps, i)
        if not len(ahead) or unit <= 0:
            return np.inf
        now, n = counts[i][position[i]], groups[i].channels
        return float(np.min((costs[i][n - ahead] - costs[i][n - now]) / ((now - ahead) * unit)))

    # a step changes the rates of the groups it shares a term with, and its own
    neighbours = [{i} | {g for t in terms if i in t.groups for g in t.groups} for i in range(len(groups))]
    rates = [rate(i) for i in range(len(groups))]
    saved = start - spend(terms, groups, keeps)
    while saved < need * (1 - 1e-12):
        i = int(np.argmin(rates)) if groups else 0
        if not groups or not np.isfinite(rates[i]):
            raise BudgetUnreachable(need, saved)
        position[i] += 1
        keeps[i] = int(counts[i][position[i]])
        saved = start - spend(terms, groups, keeps)
        for j in neighbours[i]:
            rates[j] = rate(j)
    return keeps
