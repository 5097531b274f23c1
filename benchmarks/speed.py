"""Compression speed and memory on an ImageNet-size VGG-16, and latency of a merged ResNet-56.

    python benchmarks/speed.py          (make bench)

Prints: load+save time of the VGG-16 file, `onnx-merge compress --ratio 0.5 --no-verify`
time and peak memory (a separate process, so its peak RSS is its own), and the onnxruntime
CPU latency of the paper's ResNet-56 before and after merging at ratio 0.5 (batch 32,
2 threads, median of interleaved runs).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_merge import compress
from onnx_merge.bench import bench_models
from onnx_merge.models.resnet import resnet_paper
from onnx_merge.models.vgg import vgg16_imagenet

SHARED = Path(__file__).resolve().parents[2] / "shared"


def vgg_figures(folder: Path) -> None:
    path = folder / "vgg16.onnx"
    onnx.save(vgg16_imagenet(), path)
    size = path.stat().st_size
    start = time.perf_counter()
    onnx.save(onnx.load(path), folder / "copy.onnx")
    load_save = time.perf_counter() - start
    (folder / "copy.onnx").unlink()
    cmd = [sys.executable, "-m", "onnx_merge.cli", "compress", str(path), "-o", str(folder / "small.onnx"),
           "--ratio", "0.5", "--no-verify"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"VGG-16 ImageNet: file {size / 2**20:.0f} MiB; onnx.load + onnx.save {load_save:.2f} s")
    print(f"compress --ratio 0.5: {elapsed:.2f} s ({elapsed / load_save:.2f}x load+save); "
          f"peak RSS {peak / 2**20:.0f} MiB ({peak / size:.2f}x file size)")


def latency_figures(folder: Path) -> None:
    weights = SHARED / "weights" / "resnet56_cifar10.npz"
    if not weights.is_file():
        print(f"{weights} missing: latency figures skipped")
        return
    model = resnet_paper(dict(np.load(weights)), fold=True)
    onnx.save(model, folder / "r56.onnx")
    onnx.save(compress(model, ratio=0.5)[0], folder / "r56_merged.onnx")
    rows = bench_models([folder / "r56.onnx", folder / "r56_merged.onnx"], batch=32, threads=2, runs=30, warmup=3)
    for r in rows:
        print(f"{Path(r['model']).name}: p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, "
              f"ratio {r['p50_ratio']:.3f}, params {r['params']:,}, MACs {r['macs']:,}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        latency_figures(Path(tmp))
        vgg_figures(Path(tmp))
