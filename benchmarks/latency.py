"""Are compressed models as fast as their MACs say? Issue 23's acceptance, measured in one run.

    .venv/bin/python benchmarks/latency.py /tmp/arch [--runs 200] [--block 10] [--only NAME ...]

For torchvision MobileNetV2 (0.3, --coupled prune), ResNet-50 (0.3), EfficientNet-B0 (0.3,
--coupled prune), exported at batch 1 (random weights; exports cached in the folder given, as
benchmarks/architectures.py makes them), and the paper's ResNet-56 (0.5, BN folded): compress
with the defaults (--round-to auto) and with exact counts (--round-to 1), then time each result
against the original, the two taking turns, --block runs each (onnxruntime CPU, optimizations on,
batch 1, 1 and 2 threads; --block 1 alternates run by run, each run after the other model's).
Prints each p50 ratio, the MAC ratio, and whether p50 ratio <= 1.15 x MAC ratio and < 1 holds.
Figures are ratios taken in the same run; a busy machine makes them noisy, not biased.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import export  # noqa: E402  (the benchmark next door makes the exports)

from onnx_merge import CompressOptions, compress  # noqa: E402
from onnx_merge.bench import SLOWER_THAN_MACS, bench_models  # noqa: E402
from onnx_merge.models.resnet import resnet_paper  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
# name: (ratio, coupled)
CASES = {"mobilenet_v2": (0.3, "prune"), "resnet50": (0.3, "skip"), "efficientnet_b0": (0.3, "prune"),
         "resnet56_paper": (0.5, "skip")}


def original(name: str, folder: Path) -> Path:
    if name != "resnet56_paper":
        return export(name, folder)
    path = folder / "resnet56_paper.onnx"
    if not path.exists():
        onnx.save(resnet_paper(dict(np.load(SHARED / "weights" / "resnet56_cifar10.npz")), fold=True), path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the exports are cached (outside git)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--block", type=int, default=10, help="timed runs of a model in a row (onnx_merge.bench)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES))
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    threads = tuple(int(t) for t in args.threads.split(","))
    table, met = [], True
    for name in args.only or CASES:
        ratio, coupled = CASES[name]
        src = original(name, args.folder)
        paths = [src]
        for round_to in (None, 1):
            small, _ = compress(onnx.load(str(src)), CompressOptions(ratio=ratio, coupled=coupled, round_to=round_to))
            paths.append(args.folder / f"{name}_{ratio}_{'auto' if round_to is None else 'exact'}.onnx")
            onnx.save(small, paths[-1])
        # each result timed against the original alone: a third model's runs between them would
        # evict more of their caches than one untimed run refills
        rows = [bench_models([src, path], threads=threads, runs=args.runs, warmup=10, block=args.block,
                             memory=False) for path in paths[1:]]
        for t in threads:
            auto, exact = ([r for r in pair if r["threads"] == t][1] for pair in rows)
            ok = auto["p50_ratio"] <= SLOWER_THAN_MACS * auto["macs_ratio"] and auto["p50_ratio"] < 1.0
            met &= ok
            table.append([name, f"{ratio} {'coupled' if coupled == 'prune' else ''}", t, f"{auto['macs_ratio']:.3f}",
                          f"{auto['p50_ratio']:.3f}", f"{auto['p50_ratio'] / auto['macs_ratio']:.2f}",
                          f"{exact['macs_ratio']:.3f}", f"{exact['p50_ratio']:.3f}",
                          f"{exact['p50_ratio'] / exact['macs_ratio']:.2f}", "yes" if ok else "NO"])
        print(tabulate(table[-len(threads):], tablefmt="plain"), flush=True)
    print(tabulate(table, headers=["model", "ratio", "threads", "MACs auto", "p50 auto", "p50/MACs",
                                   "MACs exact", "p50 exact", "p50/MACs", "met"], tablefmt="github"))
    print("all met" if met else "not all met: p50 ratio <= 1.15 x MAC ratio and < 1 is the acceptance")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
