"""A model over 2 GB (weights in external data) goes through compress and verify.

    python benchmarks/large_model.py        (make large)

Builds three Gemm(60000 -> 4096) layers on three inputs, summed, Relu, Gemm(4096 -> 10):
about 2.9 GB of float32 weights (no single tensor may exceed protobuf's 2 GB), saves it with
external data, runs `onnx-merge compress --ratio 0.5 --coupled prune` (verification on), and
prints wall time, peak memory and the written files.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN_FEATURES, HIDDEN, OUT, BRANCHES = 60_000, 4096, 10, 3


def build(path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, inputs = [], [], []
    for i in range(BRANCHES):
        w = rng.standard_normal((HIDDEN, IN_FEATURES), dtype=np.float32) * np.float32(IN_FEATURES ** -0.5)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Gemm", [f"x{i}", f"w{i}"], [f"h{i}"], name=f"fc{i}", transB=1))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["batch", IN_FEATURES]))
    nodes += [helper.make_node("Sum", [f"h{i}" for i in range(BRANCHES)], ["h"], name="sum"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("Gemm", ["r", "head"], ["y"], name="head", transB=1)]
    inits.append(numpy_helper.from_array(rng.standard_normal((OUT, HIDDEN), dtype=np.float32), "head"))
    graph = helper.make_graph(nodes, "large", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                      ["batch", OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def main() -> None:
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        src, out = Path(tmp) / "large.onnx", Path(tmp) / "small.onnx"
        build(src)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        start = time.perf_counter()
        cmd = ["/usr/bin/time", "-f", "peak RSS %M KiB", sys.executable, "-m", "onnx_merge.cli", "compress",
               str(src), "-o", str(out), "--ratio", "0.5", "--coupled", "prune"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        print(done.stdout[-1500:], done.stderr[-500:])
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
        print(f"input {size / 2**30:.2f} GiB; exit {done.returncode}; {elapsed:.1f} s; files {files}")


if __name__ == "__main__":
    main()
