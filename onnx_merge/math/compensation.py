"""The compensation matrix Z and its application to a consumer's weights.

Original activations are approximated from the kept ones as

    a_n ~= sum_p Z[p, n] * a'_p + c_n

(METHOD.md section 1; ``c_n`` is an optional constant, the expected value of what a removed
channel carried and no kept channel replaces). The consumer absorbs Z and c:

    W'[:, p] = sum_n W[:, n] Z[p, n]          b' = b + sum_n W[:, n] c_n

Z is stored sparsely for merging (one partner and one scale per removed channel) and as a
dense block over the removed columns only for multi-neuron solves; the kept columns of Z
are always the identity. Nothing here builds the dense P x N matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Compensation:
    """How N channels map onto the P kept ones.

    kept:    (P,) sorted indices of the kept channels.
    partner: (N,) for each channel, the position in ``kept`` it is merged into, or -1.
             Kept channels point at themselves with scale 1.
    scale:   (N,) the merge scale of each channel (0 where partner is -1).
    dense:   optional (P, R) coefficients for the R removed channels (``removed`` order),
             added on top of the sparse part.
    offset:  optional (N,) constant c_n per channel absorbed into the consumer's bias.
    """

    kept: np.ndarray
    partner: np.ndarray
    scale: np.ndarray
    dense: np.ndarray | None = None
    offset: np.ndarray | None = None
    notes: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.partner)

    @property
    def removed(self) -> np.ndarray:
        mask = np.ones(self.n, dtype=bool)
        mask[self.kept] = False
        return np.flatnonzero(mask)

    @property
    def merged(self) -> np.ndarray:
        """Removed channels that have a partner."""
        removed = self.removed
        return removed[self.partner[removed] >= 0]

    @classmethod
    def prune(cls, n: int, kept: np.ndarray) -> "Compensation":
        kept = np.sort(np.asarray(kept, dtype=np.int64))
        partner = np.full(n, -1, dtype=np.int64)
        partner[kept] = np.arange(len(kept))
        scale = np.zeros(n, dtype=np.float64)
        scale[kept] = 1.0
        return cls(kept=kept, partner=partner, scale=scale)

    def to_dense(self) -> np.ndarray:
        """The full P x N matrix Z, for tests and small inspections only."""
        z = np.zeros((len(self.kept), self.n))
        cols = np.flatnonzero(self.partner >= 0)
        z[self.partner[cols], cols] = self.scale[cols]
        if self.dense is not None:
            z[:, self.removed] += self.dense
        return z


def compensate_consumer(view: np.ndarray, comp: Compensation) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply Z (and c) to a consumer's weights.

    view: (N, B, M, K) the consumer weights with the channel axis first: N channels, B
          input features per channel (B > 1 after a Flatten, where channel n owns a
          contiguous block), M outputs, K kernel taps.
    Returns the (P, B, M, K) weights and the (M,) bias delta (None when there is no offset).
    """
    return _compensate(view, 0, 2, comp)


def compensate_along(weight: np.ndarray, axis: int, out_axis: int, comp: Compensation, block: int = 1,
                     interleaved: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """compensate_consumer on weights in their own layout, so that nothing is transposed: a
    Gemm after a Flatten can hold hundreds of MB, and each transposing copy costs a pass over it.

    ``axis`` of ``weight`` holds the N x ``block`` input features (channel-major: channel n owns
    features n*block ... ; ``interleaved``: feature b*N + n), ``out_axis`` the outputs. Returns the
    weights with P x block features on ``axis`` (C-contiguous) and the bias delta per output.
    """
    shape = weight.shape
    pair = (block, comp.n) if interleaved else (comp.n, block)
    split = weight.reshape(shape[:axis] + pair + shape[axis + 1:])  # a view of a contiguous array
    channel = axis + 1 if interleaved else axis
    out, bias = _compensate(split, channel, out_axis + (out_axis > axis), comp)
    return out.reshape(shape[:axis] + (len(comp.kept) * block,) + shape[axis + 1:]), bias


def scatter_add(target: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """target[index[i]] += values[i] along axis 0, repeated indices summed: np.add.at's result,
    in as many buffered fancy-index adds as an index repeats (np.add.at is unbuffered: 0.31 s of
    the 0.42 s that compensating VGG-16's first classifier layer takes)."""
    order = np.argsort(index, kind="stable")
    ordered = index[order]
    rank = np.arange(len(ordered)) - np.searchsorted(ordered, ordered)  # place among equal indices
    for r in range(int(rank.max(initial=-1)) + 1):
        chosen = order[rank == r]  # each index at most once
        target[index[chosen]] += values[chosen]


def _compensate(w: np.ndarray, channel: int, out_axis: int, comp: Compensation) -> tuple[np.ndarray, np.ndarray | None]:
    """Z (and c) applied along ``channel`` of ``w``; the layout of every other axis is kept."""
    if w.shape[channel] != comp.n:
        raise ValueError(f"consumer has {w.shape[channel]} input channels, compensation expects {comp.n}")
    out = np.take(w, comp.kept, axis=channel)
    merged = comp.merged
    if len(merged):
        # Sparse scatter-add of the merged columns into their partners.
        moved = np.moveaxis(np.take(w, merged, axis=channel), channel, 0)
        scale = comp.scale[merged].astype(w.dtype).reshape((-1,) + (1,) * (w.ndim - 1))
        scatter_add(np.moveaxis(out, channel, 0), comp.partner[merged], moved * scale)
    removed = comp.removed
    if comp.dense is not None and len(removed):
        added = np.tensordot(comp.dense.astype(w.dtype), np.take(w, removed, axis=channel), axes=([1], [channel]))
        out += np.moveaxis(added, 0, channel)
    bias = None
    if comp.offset is not None and np.any(comp.offset):
        per_output = np.tensordot(comp.offset, w, axes=([0], [channel]))  # the channel axis summed away
        keep = out_axis - (out_axis > channel)
        bias = per_output.sum(axis=tuple(a for a in range(per_output.ndim) if a != keep))
    return out.astype(w.dtype, copy=False), bias
