"""Compression speed and memory on an ImageNet-size VGG-16, and latency of a merged ResNet-56.

    python benchmarks/speed.py          (make bench)

Prints: load+save time of the VGG-16 file, `onnx-merge compress --ratio 0.5 --no-verify`
time and peak memory (separate processes, so each peak RSS is its own; five of each, alternating), and the onnxruntime
CPU latency of the paper's ResNet-56 before and after merging at ratio 0.5 (batch 32,
2 threads, median of runs taken in turns as `onnx-merge bench` takes them).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnx_merge import compress
from onnx_merge.bench import bench_models
from onnx_merge.models.resnet import resnet_paper

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _child(code: str) -> tuple[float, int]:
    """Run ``code`` in a fresh interpreter; its wall time and peak RSS in bytes (its own, as it
    reports them: a forked child would count the parent's pages too)."""
    probe = ("import resource, time; t = time.perf_counter()\n" + code +
             "\nprint(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    seconds, kib = out.strip().splitlines()[-1].split()
    return float(seconds), int(kib) * 1024


def vgg_figures(folder: Path, repeats: int = 5) -> None:
    """Load+save and compress alternately, ``repeats`` times each (this machine's page-zeroing
    speed drifts by half between minutes): medians, and the ratio of each adjacent pair."""
    import statistics

    path = folder / "vgg16.onnx"
    _child(f"import onnx; from onnx_merge.models.vgg import vgg16_imagenet; onnx.save(vgg16_imagenet(), {str(path)!r})")
    size = path.stat().st_size
    load_saves, compresses, peaks = [], [], []
    for _ in range(repeats):
        load_save, _ = _child(f"import onnx; onnx.save(onnx.load({str(path)!r}), {str(folder / 'copy.onnx')!r})")
        (folder / "small.onnx").unlink(missing_ok=True)
        elapsed, peak = _child("from onnx_merge.cli import main; main(['compress', %r, '-o', %r, '--ratio', '0.5', "
                               "'--no-verify'])" % (str(path), str(folder / "small.onnx")))
        load_saves.append(load_save)
        compresses.append(elapsed)
        peaks.append(peak)
    pairs = ", ".join(f"{c / ls:.2f}" for c, ls in zip(compresses, load_saves))
    load_save, elapsed, peak = statistics.median(load_saves), statistics.median(compresses), max(peaks)
    print(f"VGG-16 ImageNet: file {size / 2**20:.0f} MiB; onnx.load + onnx.save median {load_save:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in load_saves)})")
    print(f"compress --ratio 0.5 --no-verify: median {elapsed:.2f} s ({elapsed / load_save:.2f}x load+save; "
          f"pairs {pairs}); peak RSS {peak / 2**20:.0f} MiB ({peak / size:.2f}x file size)")


def latency_figures(folder: Path) -> None:
    weights = SHARED / "weights" / "resnet56_cifar10.npz"
    if not weights.is_file():
        print(f"{weights} missing: latency figures skipped")
        return
    model = resnet_paper(dict(np.load(weights)), fold=True)
    onnx.save(model, folder / "r56.onnx")
    onnx.save(compress(model, ratio=0.5)[0], folder / "r56_merged.onnx")
    rows = bench_models([folder / "r56.onnx", folder / "r56_merged.onnx"], batches=(32,), threads=(2,), runs=150, warmup=10)
    for r in rows:
        print(f"{Path(r['model']).name}: p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, "
              f"ratio {r['p50_ratio']:.3f}, params {r['params']:,}, MACs {r['macs']:,}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        latency_figures(Path(tmp))
        vgg_figures(Path(tmp))
