"""Which neurons to keep: per-layer counts and ranking criteria (METHOD.md section 2)."""

from __future__ import annotations

import math

import numpy as np

CRITERIA = ("l1-norm", "l2-norm", "l2-GM", "l2-path", "merge-cost")


def select_per_block(scores: np.ndarray, n_keep: int, blocks: int = 1) -> np.ndarray:
    """Sorted indices of the ``n_keep`` highest scores; with ``blocks`` > 1, the ``n_keep / blocks``
    highest of each of that many equal contiguous blocks (a grouped conv's groups must stay equal)."""
    n = len(scores)
    if blocks == 1:
        return np.sort(np.argsort(-scores, kind="stable")[:n_keep])
    if n % blocks or n_keep % blocks:
        raise ValueError(f"{n_keep} of {n} channels do not split evenly over {blocks} blocks")
    width, per = n // blocks, n_keep // blocks
    return np.concatenate([j * width + np.sort(np.argsort(-scores[j * width:(j + 1) * width], kind="stable")[:per])
                           for j in range(blocks)])


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


# Where a conv is narrower than its kernels' block, rounding toward a faster count may add at
# most this fraction of its channels; a grouped conv's block and group count together, too.
ALIGN_SLACK = 1 / 8
MIN_STEP = 4  # a depthwise conv at a multiple of 4 channels: ~1.2x; elsewhere 2.4x


def channel_step(n: int, block: int, slack: float = ALIGN_SLACK, whole_blocks: bool = True) -> int:
    """The step kept counts of a conv of ``n`` channels are rounded up to.

    ``block`` where the layer is at least a block wide: onnxruntime's blocked (NCHWc) convs pad
    the output channels to a whole block, so every count between two multiples runs as slowly
    as the next multiple up, with fewer channels (a 3x3 conv 32 -> C -> 32 at 56x56, AVX-512,
    block 16: C = 17 ... 31 took 0.97-1.33x the time of 32, C = 16 0.63x; benchmarks/channel_steps.py).
    Narrower than a block, or without ``whole_blocks`` (a budget that needs more than whole
    blocks can give): the largest of block, block / 2, ... down to MIN_STEP whose rounding adds
    at most ``slack * n`` channels (at most step - 1 of them), else 1. A count of n alone, so a
    rounded count rounds to itself."""
    if whole_blocks and 1 < block <= n:
        return block
    step = block
    while step >= MIN_STEP:
        if step - 1 <= slack * n:
            return step
        step //= 2
    return 1


def channel_floor(n: int, block: int) -> int:
    """The fewest channels a layer of ``n`` keeps: a layer at least a block wide keeps a block.
    A conv left narrower than its kernels' block falls off them and saves far less time than
    MACs: the paper's ResNet-56 with stage 1 at 8 of 16 ran 0.89-0.93x the time of the same model
    with stage 1 whole, at 0.75x its MACs (AVX-512, 2026-12-03, `onnx-merge bench` of the two at
    --batch 1,8 --threads 1,2; benchmarks/latency.py writes both). The
    floor spends that speed on keeping latency in step with MACs, and stage 1's accuracy;
    ``--round-to 1`` takes it."""
    return block if 1 < block <= n else 1


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
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * dots(rows, rows), 0.0)
        return np.sqrt(d2).sum(axis=1)
    if criterion == "merge-cost":
        raise ValueError("merge-cost chooses a set of channels, not a score per channel: use select_kept")
    raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")


def _chunks(rows: np.ndarray, size: int = 256):
    """Row blocks, so that temporaries stay small on wide layers."""
    return [rows[i:i + size] for i in range(0, max(len(rows), 1), size)] if len(rows) else [rows]


def row_norms(rows: np.ndarray) -> np.ndarray:
    """L2 norm of each row, accumulated in float64 block by block."""
    return np.sqrt(np.concatenate([np.einsum("nd,nd->n", c, c, dtype=np.float64) if c.dtype == np.float64 else
                                   np.square(c, dtype=np.float64).sum(axis=1) for c in _chunks(rows)]))


def dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T as float64. The product runs in the operands' dtype when that is float32 or wider
    (wide float32 layers stay float32), in float32 for float16 weights: NumPy has no BLAS for
    float16, and a float16 product of a 4,096-wide layer takes minutes."""
    dtype = np.promote_types(np.result_type(a, b), np.float32)
    return (a.astype(dtype, copy=False) @ b.astype(dtype, copy=False).T).astype(np.float64)


def select_kept(rows: np.ndarray, n_keep: int, criterion: str, consumer_norms: np.ndarray | None = None,
                threshold: float = 0.1) -> np.ndarray:
    """Sorted indices of the ``n_keep`` most important rows (ties: lower index wins).

    ``threshold`` is the merge's minimum cosine, which "merge-cost" needs to know what a merge recovers.
    """
    if criterion == "merge-cost":
        return merge_cost_kept(rows, n_keep, threshold)
    scores = importance(rows, criterion, consumer_norms)
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n_keep])


def merge_cost_kept(rows: np.ndarray, n_keep: int, threshold: float = 0.1) -> np.ndarray:
    """Sorted indices of ``n_keep`` rows chosen so that merging the others onto them loses least.

    Merging row u_j onto its most similar kept row u_k (cosine c >= threshold) with the
    projection scale leaves the residual |u_j|^2 (1 - c^2); a row with no such partner loses
    |u_j|^2. Backward elimination removes, one at a time, the row whose removal adds least to
    the summed residual: its own residual against the best remaining row, plus what the rows
    already removed onto it lose by moving to their next best partner. A norm ranking keeps
    near-copies of one another and removes rows that have no partner; this keeps one of each
    near-copy and lets the others merge onto it.
    """
    rows = np.asarray(rows)
    n = len(rows)
    norms = row_norms(rows)
    sq = norms ** 2
    safe = np.where(norms > 0, norms, 1.0)
    # gain[i, k]: how much of |u_i|^2 merging onto k recovers; never a row onto itself. Worked
    # in place: this N x N matrix is the largest thing the selection holds.
    gain = dots(rows, rows)
    gain /= safe[:, None]
    gain /= safe[None, :]
    np.clip(gain, 0.0, 1.0, out=gain)
    gain[gain < threshold] = 0.0
    np.square(gain, out=gain)
    gain *= sq[:, None]
    np.fill_diagonal(gain, -1.0)
    alive = np.ones(n, dtype=bool)
    best, runner, first, second = _two_best(gain, np.arange(n), np.arange(n))
    while alive.sum() > n_keep:
        dead = ~alive
        rehome = np.bincount(best[dead], weights=(first - second)[dead], minlength=n + 1)[:n]
        cost = np.where(alive, sq - first + rehome, np.inf)
        gone = int(np.argmin(cost))
        alive[gone] = False
        # only rows that had ``gone`` as one of their two best partners need them found again
        stale = np.flatnonzero((best == gone) | (runner == gone))
        if len(stale):
            best[stale], runner[stale], first[stale], second[stale] = _two_best(gain, stale, np.flatnonzero(alive))
    return np.flatnonzero(alive)


def _two_best(gain: np.ndarray, rows: np.ndarray, live: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, ...]:
    """For each of ``rows``: its best and second-best partners among ``live`` (index len(gain)
    for none) and their gains (0 for none). Row blocks keep the temporaries small."""
    cand = np.r_[live, len(gain), len(gain)]  # two "no partner" columns of gain 0
    out = [np.empty(len(rows), np.int64), np.empty(len(rows), np.int64), np.empty(len(rows)), np.empty(len(rows))]
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        g = np.hstack([gain[np.ix_(part, live)], np.zeros((len(part), 2))])
        top = np.argpartition(-g, 1, axis=1)[:, :2]
        val = np.take_along_axis(g, top, axis=1)
        flip = val[:, 1] > val[:, 0]
        top[flip], val[flip] = top[flip][:, ::-1], val[flip][:, ::-1]
        block = slice(start, start + len(part))
        out[0][block], out[1][block] = cand[top[:, 0]], cand[top[:, 1]]
        out[2][block], out[3][block] = np.maximum(val[:, 0], 0.0), np.maximum(val[:, 1], 0.0)
    return tuple(out)
