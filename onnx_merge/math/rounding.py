"""Latency-aware channel counts: kept counts that stay on the runtime's fast kernels.

onnxruntime's CPU convolutions run in a blocked NCHWc layout (block 16 with AVX-512, 8 with
AVX2); a channel count that is not a multiple of the block falls back to slower kernels.
``benchmarks/channel_steps.py`` measured it on this project's AVX-512 machine (1 thread, 28x28,
latency over the latency the MACs predict): a 3x3 conv at multiples of 16 1.02x, of 8 1.16x,
other counts 1.34x; an inverted residual (1x1 expand, 3x3 depthwise) at multiples of 4 about
1.2x, other counts 2.4x; a MatMul feed-forward block shows no step (1.14x either way). So conv
layers round their kept count up to a block, and dense layers keep exact counts.
"""

from __future__ import annotations

import math

# Blocks tried from the largest; rounding up may add at most this share of the layer's channels.
BLOCK_SLACK = 0.125


def round_kept(n: int, kept: int, blocks: tuple[int, ...], slack: float = BLOCK_SLACK) -> int:
    """``kept`` rounded up to the largest of ``blocks`` (largest first) that adds no more than
    ``slack * n`` channels; the smallest block where none does. Never above ``n``; unchanged
    when ``kept`` is ``n`` or no blocks are given."""
    if kept >= n or not blocks:
        return min(kept, n)
    for block in blocks:
        rounded = math.ceil(kept / block) * block
        if rounded - kept <= slack * n:
            return min(n, rounded)
    return min(n, math.ceil(kept / blocks[-1]) * blocks[-1])


def conv_blocks(simd_block: int) -> tuple[int, ...]:
    """Blocks to try for a conv layer when the CPU's NCHWc block is ``simd_block`` (16 or 8):
    the block and its halves down to 4, the granularity the depthwise kernels need."""
    blocks, b = [], simd_block
    while b >= 4:
        blocks.append(b)
        b //= 2
    return tuple(blocks)
