"""Calibration inputs served in batches, with mixed samples added.

A few hundred calibration samples pin a wide consumer down poorly, and a least-squares fit or
a block refinement on them overfits. The original model gives a target for any input, not
only for the samples given, so the set is enlarged with convex combinations of two of its
samples, lam * x_i + (1 - lam) * x_j with lam ~ U(0, 1) (mixup, Zhang et al. 2018). They stay
between real samples, and the fits must agree with the original model there too.

Only floating-point inputs can be mixed: a model taking token ids or masks as integers is
calibrated on its samples alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class CalibrationSet:
    """``feeds`` (input name -> array, samples first) in batches of ``batch``: the samples as
    given, and ``mixed_copies`` times as many mixed ones. Every pass over it yields the same
    batches, so statistics gathered layer by layer see the same rows."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int, mixed_copies: int = 1, seed: int = 0):
        self.feeds = feeds
        self.batch = batch
        self.samples = len(next(iter(feeds.values())))
        mixable = all(np.issubdtype(v.dtype, np.floating) for v in feeds.values())
        copies = mixed_copies if mixable and self.samples > 1 else 0
        rng = np.random.default_rng(seed)
        self.pairs = [(rng.permutation(self.samples), rng.uniform(0.0, 1.0, self.samples)) for _ in range(copies)]

    @property
    def mixed(self) -> int:
        """How many mixed samples there are (consumers with rows enough do not read them)."""
        return self.samples * len(self.pairs)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The samples as given."""
        for start in range(0, self.samples, self.batch):
            yield {k: v[start:start + self.batch] for k, v in self.feeds.items()}

    def mixed_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The mixed samples (none where the inputs cannot be mixed)."""
        for partner, lam in self.pairs:
            for start in range(0, self.samples, self.batch):
                rows = slice(start, start + self.batch)
                yield {k: mix(v[rows], v[partner[rows]], lam[rows]) for k, v in self.feeds.items()}


def mix(a: np.ndarray, b: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """lam * a + (1 - lam) * b, one lam per sample (the leading axis), in a's dtype."""
    weight = lam.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
    return weight * a + (1 - weight) * b
