"""How much of today's CNNs ``compress`` reaches: parameters and MACs removed at --ratio 0.3
(defaults), against the targets of issue 17; ``--ratio 0`` must leave the outputs equal and
``--coupled prune`` must write a valid model or refuse with a reason.

    .venv/bin/python benchmarks/architectures.py /tmp/arch [--only NAME ...]

Random weights (nothing is downloaded), batch 1, the TorchScript exporter at opset 17 (and the
dynamo exporter for MobileNetV2). Exports are cached in the folder given and reused.
Needs torch, torchvision and timm (see COMMON setup in the README's development section).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tabulate import tabulate

from onnx_merge import CompressOptions, compress

# name: (library, constructor, exporter, params % target, MACs % target)
ARCHITECTURES = {
    "efficientnet_b0": ("torchvision", "efficientnet_b0", "torchscript", 18, 18),
    "mobilenet_v2": ("torchvision", "mobilenet_v2", "torchscript", 22, 18),
    "mobilenet_v2_dynamo": ("torchvision", "mobilenet_v2", "dynamo", 22, 18),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", "torchscript", 28, 18),
    "mnasnet0_5": ("torchvision", "mnasnet0_5", "torchscript", 22, 18),
    "mixnet_s": ("timm", "mixnet_s", "torchscript", 15, 15),
    "ghostnet_100": ("timm", "ghostnet_100", "torchscript", 28, 15),
    "regnet_y_400mf": ("torchvision", "regnet_y_400mf", "torchscript", 10, 15),
    "squeezenet1_1": ("torchvision", "squeezenet1_1", "torchscript", 20, 20),
    "googlenet": ("torchvision", "googlenet", "torchscript", 28, 28),
    "densenet121": ("torchvision", "densenet121", "torchscript", 28, 24),
    "shufflenet_v2_x1_0": ("torchvision", "shufflenet_v2_x1_0", "torchscript", 17, 4),
    "resnet18": ("torchvision", "resnet18", "torchscript", 25, 25),
    "resnet50": ("torchvision", "resnet50", "torchscript", 30, 32),
    "resnet18d": ("timm", "resnet18d", "torchscript", 25, 25),
    "alexnet": ("torchvision", "alexnet", "torchscript", 45, 45),
}
# No targets: architectures beyond the list, measured for robustness (--all)
MORE = {
    "resnext50_32x4d": ("torchvision", "resnext50_32x4d", "torchscript", None, None),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large", "torchscript", None, None),
    "inception_v3": ("torchvision", "inception_v3", "torchscript", None, None),
    "efficientnet_b0_dynamo": ("torchvision", "efficientnet_b0", "dynamo", None, None),
    "densenet121_dynamo": ("torchvision", "densenet121", "dynamo", None, None),
    "timm_efficientnet_b0": ("timm", "efficientnet_b0", "torchscript", None, None),
    "timm_mobilenetv3_large_100": ("timm", "mobilenetv3_large_100", "torchscript", None, None),
    "regnetx_002": ("timm", "regnetx_002", "torchscript", None, None),
    "convnext_atto": ("timm", "convnext_atto", "torchscript", None, None),
    "vgg11_bn": ("torchvision", "vgg11_bn", "torchscript", None, None),
    "squeezenet1_0": ("torchvision", "squeezenet1_0", "torchscript", None, None),
    "ghostnet_dynamo": ("timm", "ghostnet_100", "dynamo", None, None),
}


SIZE = {"inception_v3": (299, 299)}


def _torchvision():
    import torch

    # torchvision registers its C++ ops on import; the CPU wheel here lacks them, so declare two
    # (once per process: a test module may have declared them already)
    lib = None
    if "torchvision" not in sys.modules:
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            lib = None
    import torchvision

    return torchvision, lib


def export(name: str, folder: Path, dynamic_batch: bool = False) -> Path:
    """The cached export of ``name`` (batch 1; a symbolic batch dimension with ``dynamic_batch``)."""
    path = folder / f"{name}{'_dynbatch' if dynamic_batch else ''}.onnx"
    if path.exists():
        return path
    import torch

    library, constructor, exporter, *_ = {**ARCHITECTURES, **MORE}[name]
    torch.manual_seed(0)
    if library == "timm":
        import timm

        model = timm.create_model(constructor, pretrained=False)
    else:
        torchvision, _lib = _torchvision()
        kw = {"aux_logits": False, "init_weights": True} if constructor in ("googlenet", "inception_v3") else {}
        model = getattr(torchvision.models, constructor)(weights=None, **kw)
    model.eval()
    x = torch.randn(1, 3, *SIZE.get(constructor, (224, 224)))
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        if exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            torch.onnx.export(model, (x,), str(tmp), dynamo=True, opset_version=18, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=shapes)
        else:
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes=axes)
    onnx.save(onnx.load(str(tmp)), str(path))  # one file, external data (dynamo) folded in
    tmp.unlink()
    for extra in folder.glob(f"{tmp.name}*"):
        extra.unlink()
    return path


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def measure(name: str, folder: Path) -> dict:
    model = onnx.load(str(export(name, folder)))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    reference = _run(model, x)
    start = time.perf_counter()
    small, rep = compress(model, CompressOptions(ratio=0.3))
    onnx.checker.check_model(small, full_check=True)
    _run(small, x)
    row = {"params": 100 * (1 - rep["params_after"] / rep["params_before"]),
           "macs": 100 * (1 - rep["macs_after"] / rep["macs_before"]), "seconds": time.perf_counter() - start}
    same, _ = compress(model, CompressOptions(ratio=0.0))
    row["ratio0"] = float(np.max(np.abs(_run(same, x) - reference)))
    try:
        coupled, crep = compress(model, CompressOptions(ratio=0.3, coupled="prune"))
        onnx.checker.check_model(coupled, full_check=True)
        _run(coupled, x)
        row["coupled"] = (f"valid ({100 * (1 - crep['params_after'] / crep['params_before']):.0f} / "
                          f"{100 * (1 - crep['macs_after'] / crep['macs_before']):.0f} %)")
    except Exception as exc:  # a refusal is allowed, a checker failure is not: the table says which
        row["coupled"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the exports are cached (outside git)")
    parser.add_argument("--only", nargs="+", choices=sorted({**ARCHITECTURES, **MORE}), help="measure these only")
    parser.add_argument("--all", action="store_true", help="also architectures beyond the issue's list (no targets)")
    parser.add_argument("--export-only", action="store_true", help="export the models and stop")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    names = args.only or list(ARCHITECTURES) + (list(MORE) if args.all else [])
    if args.export_only:
        for name in names:
            print(name, export(name, args.folder), flush=True)
        return 0
    rows = []
    for name in names:
        *_, p_target, m_target = {**ARCHITECTURES, **MORE}[name]
        r = measure(name, args.folder)
        ok = "-" if p_target is None else "yes" if r["params"] >= p_target and r["macs"] >= m_target else "NO"
        rows.append([name, f"{r['params']:.1f} / {r['macs']:.1f}", "-" if p_target is None else f"{p_target} / {m_target}", ok,
                     f"{r['ratio0']:.1e}", r["coupled"], f"{r['seconds']:.0f}"])
        print(tabulate([rows[-1]], tablefmt="plain"), flush=True, file=sys.stderr)
    print(tabulate(rows, headers=["architecture", "params / MACs removed %", "target %", "met",
                                  "ratio 0: max |diff|", "--coupled prune", "s"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
