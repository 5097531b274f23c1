"""Latency of one conv layer against its channel count, on onnxruntime CPU (optimizations on).

    python benchmarks/channel_steps.py [--threads 1] [--size 28] [--runs 30] [--plot steps.png]

For each layer shape (a 3x3 conv, a 1x1 conv, a 3x3 depthwise conv, a MatMul feed-forward block) the output channels (and the
next layer's input channels, as after pruning) sweep from half the width to the full width, one
at a time. Each count is timed interleaved with the others, and its latency is printed beside the
latency its MACs predict from the full-width layer (``time / (MACs ratio x full time)``): a
count that falls off onnxruntime's blocked (NCHWc) kernels shows as a step above 1. It measures
the rule a latency-aware ``--round-to`` default has to follow (#23).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tabulate import tabulate

from onnx_merge.runtime import make_session


def ffn_pair(c_in: int, mid: int, tokens: int) -> onnx.ModelProto:
    """x (1, T, C) -> MatMul(C -> mid) -> Relu -> MatMul(mid -> C): a transformer feed-forward block."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((c_in, mid)).astype(np.float32) * 0.1, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((mid, c_in)).astype(np.float32) * 0.1, "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["act"]),
             helper.make_node("MatMul", ["act", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, c_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def conv_pair(c_in: int, mid: int, size: int, kernel: int, depthwise: bool) -> onnx.ModelProto:
    """x -> Conv(c_in -> mid) -> Relu -> Conv(mid -> c_in): the producer / consumer pair that
    pruning ``mid`` shrinks. A depthwise pair has a 1x1 expand to ``mid``, a 3x3 depthwise conv
    on ``mid`` and a 1x1 project, the MobileNet inverted residual."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name, x, cout, cin_per_group, k, group=1):
        w = rng.standard_normal((cout, cin_per_group, k, k)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [name], pads=[k // 2] * 4, group=group))
        return name

    x = "x"
    if depthwise:
        h = conv("expand", x, mid, c_in, 1)
        h = conv("dw", h, mid, 1, 3, group=mid)
    else:
        h = conv("first", x, mid, c_in, kernel)
    nodes.append(helper.make_node("Relu", [h], ["act"]))
    conv("second", "act", c_in, mid, 1 if depthwise else kernel)
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
                              [helper.make_tensor_value_info("second", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def macs(c_in: int, mid: int, kernel: int, depthwise: bool) -> int:
    if kernel == 0:  # feed-forward block
        return 2 * c_in * mid
    if depthwise:
        return c_in * mid * 2 + mid * 9
    return 2 * c_in * mid * kernel * kernel


def sweep(c_in: int, width: int, size: int, kernel: int, depthwise: bool, threads: int, runs: int) -> list[dict]:
    counts = list(range(width // 2, width + 1))
    build = (lambda m: ffn_pair(c_in, m, size * size // 16)) if kernel == 0 else \
        (lambda m: conv_pair(c_in, m, size, kernel, depthwise))
    sessions = [make_session(build(m).SerializeToString(), "cpu", optimize=True, threads=threads) for m in counts]
    shape = (1, size * size // 16, c_in) if kernel == 0 else (1, c_in, size, size)
    feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    times = [[] for _ in counts]
    for s in sessions:
        s.run(None, feed)
    for _ in range(runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - start)
    full = float(np.median(times[-1]))
    return [{"channels": m, "ms": 1000 * float(np.median(t)),
             "vs_macs": float(np.median(t)) / (full * macs(c_in, m, kernel, depthwise) / macs(c_in, width, kernel, depthwise))}
            for m, t in zip(counts, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=28, help="feature map height and width")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--plot", help="write a PNG of latency / MAC-predicted latency against channels")
    args = parser.parse_args()
    shapes = {"3x3 conv, 64 -> C -> 64": (64, 64, 3, False), "1x1 conv, 128 -> C -> 128": (128, 128, 1, False),
              "inverted residual, 32 -> C (dw 3x3) -> 32": (32, 96, 1, True),
              "feed-forward, 128 -> C -> 128 (tokens = size^2 / 16)": (128, 256, 0, False)}
    results = {}
    for label, (c_in, width, kernel, dw) in shapes.items():
        results[label] = rows = sweep(c_in, width, args.size, kernel, dw, args.threads, args.runs)
        print(f"\n{label} ({args.size}x{args.size}, {args.threads} thread(s), p50 over {args.runs} runs)")
        print(tabulate([[r["channels"], f"{r['ms']:.3f}", f"{r['vs_macs']:.2f}", "x" if r["channels"] % 16 == 0 else
                         ("." if r["channels"] % 8 == 0 else "")] for r in rows],
                       headers=["C", "p50 ms", "time / MAC-predicted", "mult of 16 (x) / 8 (.)"]))
        for block in (8, 16):
            on = [r["vs_macs"] for r in rows if r["channels"] % block == 0]
            off = [r["vs_macs"] for r in rows if r["channels"] % block]
            print(f"  multiples of {block}: median {np.median(on):.2f}x the MAC-predicted time; others {np.median(off):.2f}x")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5))
        for ax, (label, rows) in zip(axes, results.items()):
            c = [r["channels"] for r in rows]
            ax.plot(c, [r["vs_macs"] for r in rows], ".-")
            ax.axhline(1.0, color="grey", lw=0.5)
            for x in c:
                if x % 16 == 0:
                    ax.axvline(x, color="tab:red", lw=0.4, ls=":")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("channels kept")
        axes[0].set_ylabel("latency / MAC-predicted latency")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
