"""Reading and writing models and arrays. The only module that touches the filesystem.

- External data is validated before it is read: locations must stay inside the model's
  folder (no absolute paths, no '..' escapes) and the byte ranges must exist.
- Saving is atomic: everything is written into a temporary folder beside the target,
  checked with ``onnx.checker`` (path-based, so models over 2 GB work), then renamed into
  place. On failure nothing is left behind, and the input is never overwritten.
- The IR version written is one the installed onnxruntime accepts.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import ModelError, UsageError
from .shapes import skeleton, tensor_nbytes

MIN_OPSET = 9
_TWO_GB = 2**31


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    external: bool  # the user stored weights in external data files


def _external_tensors(model: onnx.ModelProto):
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def _check_external_location(path: Path, tensor: onnx.TensorProto) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    base = path.parent.resolve()
    target = (base / location).resolve()
    if not location or os.path.isabs(location) or base not in target.parents:
        raise ModelError(f"{path}: tensor {tensor.name!r} points outside the model's folder ({location!r}); refused")
    if not target.is_file():
        raise ModelError(f"{path}: external data file {location!r} for tensor {tensor.name!r} is missing")
    offset = int(info.get("offset", 0) or 0)
    length = info.get("length")
    size = target.stat().st_size
    if offset < 0 or offset > size or (length is not None and offset + int(length) > size):
        raise ModelError(f"{path}: external data for tensor {tensor.name!r} lies beyond the end of {location!r}")


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a model with its weights; raise ModelError with a one-line reason if it is bad."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if model.ir_version <= 0 or not model.graph.node or not model.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph, IR version or opset)")
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise ModelError(f"{path}: opset {opset} is not supported (need {MIN_OPSET} or later)")
    if opset > max_runtime_opset():
        raise ModelError(f"{path}: opset {opset} is newer than the installed onnxruntime supports "
                         f"({max_runtime_opset()}); results could not be run or verified")
    external = _external_tensors(model)
    for tensor in external:
        _check_external_location(path, tensor)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read external data ({exc})") from None
    try:  # the structure (dangling inputs, cycles, unknown ops); weights are checked on save
        onnx.checker.check_model(skeleton(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: invalid ONNX model ({first[:300]})") from None
    return LoadedModel(model=model, path=path, external=bool(external))


def default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def _runtime_loads(ir: int, opset: int) -> bool:
    """Whether the installed onnxruntime loads a one-node model stamped with ``ir`` and ``opset``."""
    from .runtime import require_runtime

    ort = require_runtime()
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir)
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        return True
    except Exception:  # onnxruntime raises its own exception types for what it refuses
        return False


@functools.cache
def max_runtime_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads."""
    ir = max_runtime_ir_version()
    return next((v for v in range(onnx.defs.onnx_opset_version(), MIN_OPSET - 1, -1) if _runtime_loads(ir, v)),
                MIN_OPSET)


@functools.cache
def max_runtime_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads, found by trying a tiny model."""
    return next((ir for ir in range(onnx.IR_VERSION, 6, -1) if _runtime_loads(ir, 13)), 7)


def runtime_ir_version(model: onnx.ModelProto) -> int:
    """The IR version to write: the model's own, lowered to what onnxruntime accepts."""
    return min(model.ir_version, max_runtime_ir_version()) if model.ir_version else max_runtime_ir_version()


def weights_size(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR versions before 4 require every initializer to be a graph input too."""
    listed = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in listed:
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def save_model(model: onnx.ModelProto, out: str | os.PathLike, *, external: bool, source: Path | None = None) -> Path:
    """Write ``model`` to ``out`` atomically, checked, with a runtime-loadable IR version.

    ``external`` keeps weights in ``<out>.data`` beside the model (forced above 2 GB).
    """
    out = Path(out)
    if source is not None and out.resolve() == source.resolve():
        raise UsageError(f"{out}: refusing to overwrite the input model; choose another output path")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: output folder {out.parent} does not exist")
    model.ir_version = runtime_ir_version(model)
    if model.ir_version < 4:
        list_initializers_as_inputs(model)
    external = external or weights_size(model) >= _TWO_GB - (64 << 20)
    data_name = out.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-merge-", dir=out.parent))
    try:
        tmp_model = tmp / out.name
        if external:
            # Tensors are marked by hand: onnx's own conversion refuses when a file named like the
            # data file exists in the *working* folder (a rerun from the output folder).
            for tensor in model.graph.initializer:
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    external_data_helper.set_external_data(tensor, data_name)
        onnx.save_model(model, str(tmp_model))
        try:
            onnx.checker.check_model(str(tmp_model), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{out}: the rewritten model fails onnx.checker ({first}); nothing written") from None
        if external:
            os.replace(tmp / data_name, out.parent / data_name)
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def remove_model(path: str | os.PathLike) -> None:
    """Delete a model this run wrote and the external-data files it references."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for location in {e.value for t in _external_tensors(model) for e in t.external_data if e.key == "location"}:
        (path.parent / location).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of an .npz file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ModelError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".onnx-merge-", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
