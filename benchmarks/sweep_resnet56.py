"""The paper's ResNet-56 (BatchNormalization kept) swept over 4 ratios x merge/regress on Ray, with 1
and then 2 workers (one core each) from empty caches, then once more from the cache; then, for
comparison, 1 worker given both cores (--threads 2); times, machine load and the table.

    python benchmarks/sweep_resnet56.py [OUTDIR]     # about 10 minutes on a 2-core machine

Writes OUTDIR/w1, OUTDIR/w2, OUTDIR/w1t2 (sweep folders) and copies the 2-worker PNG to benchmarks/sweep_resnet56.png.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import onnx
from tabulate import tabulate

from onnx_merge.models.resnet import resnet_paper
from onnx_merge.sweep import EvalSpec, run_sweep
from onnx_merge.sweep_output import summary_table

SHARED = Path(__file__).resolve().parents[2] / "shared"
HERE = Path(__file__).resolve().parent
CIFAR = EvalSpec(str(SHARED / "data" / "cifar10_test.npz"), input_key="x_exact", scale=255.0,
                 mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), layout="nhwc")
RATIOS, METHODS = [0.2, 0.3, 0.4, 0.5], ["merge", "regress"]


def timed(out: Path, workers: int, threads: int = 1):
    load = os.getloadavg()[0]
    start = time.perf_counter()
    folder = out / (f"w{workers}" + (f"t{threads}" if threads > 1 else ""))
    result = run_sweep([str(out / "resnet56_paper_bn.onnx")], METHODS, [{"ratio": r} for r in RATIOS], CIFAR,
                       folder, engine="ray", workers=workers, threads=threads,
                       pick_rule=("accuracy_drop<=1.0", "macs"))
    seconds = time.perf_counter() - start
    print(f"workers {workers} x {threads} thread(s): {seconds:.1f} s for {result.ran} jobs run ({len(result.rows)} rows), "
          f"load average {load:.1f} before / {os.getloadavg()[0]:.1f} after", flush=True)
    return result, seconds


def main(out: Path) -> None:
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    for name in ("w1", "w2", "w1t2"):
        shutil.rmtree(out / name, ignore_errors=True)
    weights = dict(np.load(SHARED / "weights" / "resnet56_cifar10.npz"))
    onnx.save(resnet_paper(weights, fold=False), out / "resnet56_paper_bn.onnx")
    _, one = timed(out, 1)
    result, two = timed(out, 2)
    print(f"2 workers / 1 worker: {two / one:.2f}")
    _, cached = timed(out, 2)
    print(f"rerun from the cache: {cached:.1f} s")
    _, both = timed(out, 1, threads=2)
    print(f"2 workers / 1 worker with both cores (--threads 2): {two / both:.2f}")
    headers, table = summary_table(result.rows)
    print(tabulate(table, headers=headers, tablefmt="github"))
    print(f"pick: {result.pick['why']}")
    shutil.copy(result.files["png"], HERE / "sweep_resnet56.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/sweep_resnet56"))
