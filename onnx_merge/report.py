"""The JSON report every command writes: one shape, one shipped schema (report.schema.json).

    {"schema_version", "tool": {name, version, onnx, onnxruntime, numpy, python},
     "command", "options" (named as on the command line), "models": [{role, path, ...}],
     "summary" (the headline figures), "verification" (or null), "details", "elapsed_s"}

A report's ``options`` can be fed back as ``compress --config REPORT.json``. Figures that are
not finite numbers (a NaN cosine) are written as null: JSON has no NaN.
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

SCHEMA_VERSION = "1.0"
SMALL_MODEL_FILE = 64 << 20  # bytes; larger model files keep (most of) their weights inline
COMMANDS = ("compress", "verify", "eval", "bench", "inspect", "sweep", "sensitivity")


def versions() -> dict:
    from . import __version__

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"name": "onnx-merge", "version": __version__, "onnx": onnx.__version__, "onnxruntime": ort_version,
            "numpy": np.__version__, "python": platform.python_version()}


def new_report(command: str, *, options: dict | None = None, models: list[dict] | None = None,
               summary: dict | None = None, verification: dict | None = None, details: dict | None = None,
               elapsed_s: float | None = None) -> dict:
    """A report of ``command`` in the shipped shape (other tools, e.g. sweeps, call this too)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    return {"schema_version": SCHEMA_VERSION, "tool": versions(), "command": command, "options": options or {},
            "models": models or [], "summary": summary or {}, "verification": verification,
            "details": details or {}, "elapsed_s": None if elapsed_s is None else round(float(elapsed_s), 3)}


def _value_info(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
            if t.HasField("shape") else None
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else None
        out.append({"name": v.name, "shape": dims, "type": dtype})
    return out


def describe_model(model: onnx.ModelProto, path: str | os.PathLike | None = None, role: str = "model", **figures) -> dict:
    """What the header shows: inputs/outputs with shapes, opset, IR version, op-type counts."""
    from .io import default_opset

    weights = {t.name for t in model.graph.initializer}
    return {"role": role, "path": None if path is None else str(path),
            "inputs": _value_info([i for i in model.graph.input if i.name not in weights]),
            "outputs": _value_info(model.graph.output), "opset": default_opset(model),
            "ir_version": int(model.ir_version),
            "op_types": dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items())), **figures}


def file_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of a model file and the external-data files it references.

    Only a small file is parsed for references: one holding its weights inline is its own size,
    and parsing it again would cost as much memory as the model.
    """
    path = Path(path)
    if not path.is_file():
        return None
    total = path.stat().st_size
    if total > SMALL_MODEL_FILE:
        return total
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model: its own size only
        return total
    locations = {e.value for t in onnx.external_data_helper._get_all_tensors(model)
                 for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def _clean(value):
    """JSON-safe: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def to_json(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, allow_nan=False)


def schema() -> dict:
    return json.loads(resources.files("onnx_merge").joinpath("report.schema.json").read_text())


def validate(report: dict) -> None:
    """Raise jsonschema.ValidationError when ``report`` (as written) does not follow the schema."""
    try:
        import jsonschema
    except ImportError:
        raise ImportError("validating a report needs jsonschema: pip install 'onnx-merge[test]' or jsonschema") from None

    jsonschema.validate(json.loads(to_json(report)), schema())


def compress_report(result: dict, options: dict) -> dict:
    """The report of one compress run, from what api.compress_file returns."""
    before, after = result["models"]
    summary = {"params_before": result["params_before"], "params_after": result["params_after"],
               "macs_before": result["macs_before"], "macs_after": result["macs_after"],
               "input_shapes": result.get("input_shapes", {}),
               "file_bytes_before": before.get("file_bytes"), "file_bytes_after": after.get("file_bytes"),
               "written": result["written"], "output": result["output"] if result["written"] else None,
               "alignment": result.get("alignment"),
               "calibration_source": result["options"].get("calibration_source")}
    ver = result.get("verification")
    summary["verdict"] = ("not verified" if ver is None else "failed" if not ver["ok"]
                          else "warning" if ver["warnings"] else "passed")
    if ver is not None:
        summary["checked_on"] = ver["data"]
    # groups pruned less than asked, or left whole, because the predicted error was too large
    held = [e["layer"] for e in result.get("layers", []) if "asked_kept" in e]
    held += [s["node"] for s in result.get("skipped", []) if "--max-group-error" in s["reason"]]
    if held:
        summary["held_back"] = held
    details = {"layers": result.get("layers", []), "skipped": result.get("skipped", []),
               "passes": result.get("passes", [])}
    for key in ("calibration", "heads", "allocation", "latency"):  # latency: compress --bench  # allocation: a --target-macs / --target-params budget
        if key in result:
            details[key] = result[key]
    return new_report("compress", options=options, models=[before, after], summary=summary, verification=ver,
                      details=details, elapsed_s=result.get("elapsed_s"))
