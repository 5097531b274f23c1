"""How long calibrated compression takes against one onnxruntime pass, at ImageNet size.

    python benchmarks/calibration_speed.py [--images 256] [--ratio 0.3] [--model PATH]

Exports torchvision's ResNet-18 (random weights, 224 x 224; needs torch and torchvision, the
[test] extra) once into a cache folder outside the repository ($ONNX_MERGE_CACHE, default
~/.cache/onnx-merge), or takes --model. Then, in one process on the same machine: one
onnxruntime pass of the calibration images through the original (batches of 64, graph
optimizations on, as calibration runs it), calibrated compress at --ratio, the ratio of the two
times, the peak memory of the process and the per-group report (rows, error of the data-free
plan and of the refit, relative to the targets' energy, the plan kept, seconds).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from tabulate import tabulate

from onnx_merge import CompressOptions, compress
from onnx_merge.runtime import make_session

CACHE = Path(os.environ.get("ONNX_MERGE_CACHE", Path.home() / ".cache" / "onnx-merge"))
EXPORT = """
import sys, torch
lib = torch.library.Library("torchvision", "DEF")  # torchvision's C++ ops are not in this wheel
lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import torchvision
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), sys.argv[1], dynamo=False, input_names=["x"],
                  output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
"""


def resnet18() -> Path:
    path = CACHE / "resnet18_224_random.onnx"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        # a separate process: torch's memory does not count against the compression's peak
        subprocess.run([sys.executable, "-c", EXPORT, str(path)], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--model", type=Path, help="an ONNX model with one (N, 3, 224, 224) input")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnx_merge").setLevel(logging.WARNING)
    logging.getLogger("onnx_merge.calibrate").setLevel(logging.INFO)  # one line per group
    path = args.model or resnet18()
    model = onnx.load(str(path))
    name = model.graph.input[0].name
    images = np.random.default_rng(0).standard_normal((args.images, 3, 224, 224)).astype(np.float32)
    session = make_session(str(path), optimize=True)
    start = time.perf_counter()
    for i in range(0, len(images), 64):
        session.run(None, {name: images[i:i + 64]})
    one_pass = time.perf_counter() - start
    del session
    start = time.perf_counter()
    _, report = compress(model, CompressOptions(ratio=args.ratio, calibration={name: images}))
    calibrated = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    rows = [[e["layer"], e["channels"], e["kept"], e.get("rows"), e.get("error", {}).get("data_free"),
             e.get("error", {}).get("calibrated"), e["calibration"][:40], e.get("seconds")] for e in report["layers"]]
    print(tabulate(rows, headers=["group", "N", "kept", "rows", "error data-free", "error refit", "plan", "s"]))
    print(f"{path.name}: {args.images} images, ratio {args.ratio}; one onnxruntime pass {one_pass:.1f} s, "
          f"calibrated compress {calibrated:.1f} s = {calibrated / one_pass:.1f} x one pass; "
          f"original-model runs {report['calibration']['original_runs']}; peak memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
