"""Reading and writing models and arrays. With files.py, the only modules that touch the filesystem.

- External data is validated before it is read: locations must stay inside the model's
  folder (no absolute paths, no '..' escapes), offsets and lengths are integers, the byte
  ranges exist, and every tensor holds as many values as its dims say.
- Saving goes through files.py: written into a temporary folder beside the target, checked
  with ``onnx.checker`` (path-based, so models over 2 GB work) and by the caller's ``check``
  (verification), then published. With external data the model and its data appear together:
  the data goes under a name no file has, the model (naming it) is renamed last, and only then
  are the files the replaced model referenced removed.
- Arrays (.npz) are checked from their headers (dtype, shape, size) before they are read.
- The IR version written is one the installed onnxruntime accepts.
"""

from __future__ import annotations

import functools
import os
import secrets
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from . import files, wire
from .errors import ModelError, OutputError, UsageError
from .files import write_bytes_atomic, write_text_atomic  # noqa: F401  (the write path others call)
from .shapes import skeleton, tensor_nbytes

MIN_OPSET = 9
_TWO_GB = 2**31
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_KNOWN_TYPES = set(onnx.helper.get_all_tensor_dtypes())
_UNSIZED = {onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED} | {
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)}


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    external: bool  # the user stored weights in external data files
    # where each top-level initializer's bytes lie on disk: name -> (file, offset, length); the
    # checks read them there (reading a tensor's raw_data from the model copies it)
    stored: dict[str, tuple[Path, int, int]] = field(default_factory=dict)


def _all_tensors(model: onnx.ModelProto):
    """Every tensor of the model: initializers, attribute tensors, and the values and indices of
    sparse initializers (onnx's own walk leaves those out), subgraphs included."""
    yield from external_data_helper._get_all_tensors(model)
    for sparse in model.graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices


def _external_tensors(model: onnx.ModelProto):
    return [t for t in _all_tensors(model) if external_data_helper.uses_external_data(t)]


def _fixed_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's values from dims and type; None for strings and sub-byte types."""
    if tensor.data_type in _UNSIZED:
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _check_external_location(path: Path, tensor: onnx.TensorProto) -> Path:
    """The data file of an external tensor, its byte range checked; a missing length (legal) is
    filled in from the dims, so that only the tensor's own bytes are read."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    base = path.parent.resolve()
    target = (base / location).resolve()
    if not location or os.path.isabs(location) or base not in target.parents:
        raise ModelError(f"{path}: tensor {tensor.name!r} points outside the model's folder ({location!r}); refused")
    if not target.is_file():
        raise ModelError(f"{path}: external data file {location!r} for tensor {tensor.name!r} is missing")
    try:
        offset = int(info.get("offset") or 0)
        length = None if info.get("length") in (None, "") else int(info["length"])
    except ValueError:
        raise ModelError(f"{path}: tensor {tensor.name!r} has a non-integer external-data offset or length "
                         f"({info.get('offset')!r}, {info.get('length')!r})") from None
    if length is None and _fixed_nbytes(tensor) is not None:
        length = _fixed_nbytes(tensor)
        tensor.external_data.add(key="length", value=str(length))
    size = target.stat().st_size
    if offset < 0 or (length is not None and length < 0) or offset > size or \
            (length is not None and offset + length > size):
        raise ModelError(f"{path}: external data for tensor {tensor.name!r} lies beyond the end of {location!r}")
    return target


def _inner_tensors(model: onnx.ModelProto):
    """_all_tensors but the top-level initializers."""
    for node in model.graph.node:
        for attribute in node.attribute:
            yield from external_data_helper._recursive_attribute_processor(
                attribute, external_data_helper._get_initializer_tensors_from_graph)
    yield from external_data_helper._get_attribute_tensors(model)
    for sparse in model.graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices


def _check_tensor_sizes(path: Path, model: onnx.ModelProto, stored: dict[str, tuple[Path, int, int]]) -> None:
    """Every tensor holds as many values as its dims say (onnxruntime would read past them).
    ``stored``: the byte counts of top-level initializers, as on disk."""
    for tensor in model.graph.initializer:
        _check_tensor_size(path, tensor, stored[tensor.name][2] if tensor.name in stored else None)
    for tensor in _inner_tensors(model):
        _check_tensor_size(path, tensor, None)


def _check_tensor_size(path: Path, tensor: onnx.TensorProto, stored_bytes: int | None) -> None:
    if tensor.data_type not in _KNOWN_TYPES or tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise ModelError(f"{path}: tensor {tensor.name!r} has no known data type ({tensor.data_type})")
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{path}: tensor {tensor.name!r} has negative dims {list(tensor.dims)}")
    if tensor.HasField("raw_data"):
        held = stored_bytes if stored_bytes is not None else len(tensor.raw_data)
        expected, unit = _fixed_nbytes(tensor), "bytes"
    elif tensor.data_type in _UNSIZED and tensor.data_type != onnx.TensorProto.STRING:
        return
    else:
        field_name = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        complex_ = tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        expected, held, unit = count * (2 if complex_ else 1), len(getattr(tensor, field_name)), "values"
    if expected is not None and held != expected:
        raise ModelError(f"{path}: tensor {tensor.name!r} has dims {list(tensor.dims)} ({expected} {unit}) "
                         f"but holds {held} {unit}")


# A model file is parsed once per run: the paths it references are asked for several times (to
# protect them, before any work and again on save), and the first parse is handed to load_model.
# Keyed by the file's identity and its size and modification time, so a rewritten file is read anew.
_references: dict[tuple, list[Path]] = {}
_parsed: dict[tuple, onnx.ModelProto] = {}


def _file_key(path: str | os.PathLike) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns


def _parse(path: str | os.PathLike, key: tuple | None) -> onnx.ModelProto:
    """The file's ModelProto without external data: the parse external_files kept, or a new one."""
    model = _parsed.pop(key, None) if key is not None else None
    return model if model is not None else onnx.load(str(path), load_external_data=False)


def external_files(path: str | os.PathLike) -> list[Path]:
    """The data files a model file references (resolved), read without its weights; [] if it
    is not a readable model. Used to protect an input's data and to clean up a replaced output."""
    key = _file_key(path)
    if key is not None and key in _references:
        return list(_references[key])
    try:
        model = _parse(path, key)
    except Exception:  # not a model (or not ours to judge here): it references nothing
        return []
    base = Path(path).parent
    found = []
    for tensor in _external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and not os.path.isabs(location):
            found.append(files.real(base / location))
    found = list(dict.fromkeys(found))
    if key is not None:
        _parsed.clear()  # one parse held at a time: the one load_model is about to ask for
        _parsed[key], _references[key] = model, found
    return list(found)


def model_files(path: str | os.PathLike) -> list[Path]:
    """A model file and its external data files: what no output may overwrite."""
    return [Path(path)] + external_files(path)


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
        model = _parse(path, _file_key(path))  # the caller owns it: no later call sees its changes
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
    stored = {name: (path, offset, length) for name, (offset, length) in wire.raw_spans(path).items()}
    for tensor in model.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        if external_data_helper.uses_external_data(tensor) and info.get("length"):
            stored[tensor.name] = ((path.parent / info["location"]).resolve(), int(info.get("offset") or 0),
                                   int(info["length"]))
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read external data ({exc})") from None
        for sparse in model.graph.sparse_initializer:  # onnx's loader leaves these out
            for tensor in (sparse.values, sparse.indices):
                if external_data_helper.uses_external_data(tensor):
                    external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
    _check_tensor_sizes(path, model, stored)
    try:  # the structure (dangling inputs, cycles, unknown ops); weights are checked on save
        onnx.checker.check_model(skeleton(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: invalid ONNX model ({first[:300]})") from None
    return LoadedModel(model=model, path=path, external=bool(external), stored=stored)


def check_inferable(model: onnx.ModelProto, path: Path) -> None:
    """The model passes onnx's strict shape inference, as every model ``save_model`` writes must."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: fails onnx's shape inference ({first[:300]}), which the compressed model "
                         "would have to pass") from None


def _values(tensor: onnx.TensorProto) -> np.ndarray:
    """A float tensor's values, viewed on its raw bytes where it has them (to_array copies them again)."""
    from onnx import numpy_helper

    if tensor.HasField("raw_data") and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        dtype = np.float32 if tensor.data_type == onnx.TensorProto.FLOAT else np.float64
        return np.frombuffer(tensor.raw_data, dtype=np.dtype(dtype).newbyteorder("<"))
    return numpy_helper.to_array(tensor)


def _stored_values(stored: tuple[Path, int, int], data_type: int) -> np.ndarray | None:
    """A float tensor's values read where they lie on disk (a mapping of the file's pages, no copy)."""
    dtype = {onnx.TensorProto.FLOAT: "<f4", onnx.TensorProto.DOUBLE: "<f8", onnx.TensorProto.FLOAT16: "<f2"}.get(data_type)
    file, offset, length = stored
    if dtype is None or length == 0 or length % np.dtype(dtype).itemsize:
        return None
    try:
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=(length // np.dtype(dtype).itemsize,))
    except (OSError, ValueError):
        return None


def _all_finite(values: np.ndarray) -> bool:
    # a float64 sum is finite exactly when every value is, unless float64 values overflow it:
    # no temporary of the tensor's size, as isfinite(values) would make
    total = np.sum(values, dtype=np.float64)
    return bool(np.isfinite(total)) or (values.dtype == np.float64 and bool(np.isfinite(values).all()))


def check_layer_weights(loaded: LoadedModel) -> None:
    """The parameters of the layers compression plans on are finite: NaN or Inf there (a
    shifted external-data offset reads garbage) would reach the least-squares fits."""
    from .ops import LAYER, rule

    model, path = loaded.model, loaded.path
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if rule(node.op_type).kind != LAYER and node.op_type != "BatchNormalization":
            continue
        for name in node.input[1:]:
            tensor = inits.get(name)
            if tensor is None or tensor.data_type not in _FLOATS:
                continue
            values = _stored_values(loaded.stored[name], tensor.data_type) if name in loaded.stored else None
            if not _all_finite(_values(tensor) if values is None else values):
                raise ModelError(f"{path}: tensor {name!r} ({node.op_type} {node.name or node.output[0]!r}) holds "
                                 "NaN or Inf values")


def load_calibration(spec: str | None):
    """--calibration: the arrays of a file, or the word "synthetic" or "none" as it is
    (api.resolve_calibration acts on it once the model is known; a file of that name is given as
    ./synthetic)."""
    from .options import DATA_FREE, SYNTHETIC

    return spec if spec in (SYNTHETIC, DATA_FREE) else load_arrays(spec) if spec else None


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


def _data_name(out: Path, avoid: set[Path]) -> str:
    """A name for the output's data file that no file has yet: ``<out>.data`` when free, else
    one with a random tag. Writing under a fresh name is what keeps the replaced model, which
    may read ``<out>.data``, intact until the new model is in place."""
    names = [f"{out.name}.data"] + [f"{out.name}.{secrets.token_hex(4)}.data" for _ in range(8)]
    for name in names:
        candidate = out.parent / name
        if not os.path.lexists(candidate) and files.real(candidate) not in avoid:
            return name
    raise OutputError(f"{out}: could not find a free name for its data file")


def save_model(model: onnx.ModelProto, out: str | os.PathLike, *, external: bool, source: Path | None = None,
               protect=(), check=None) -> Path:
    """Write ``model`` to ``out`` atomically, checked, with a runtime-loadable IR version.

    ``external`` keeps weights in a data file beside the model (forced above 2 GB).
    ``source``: the input model; it, its data files and ``protect`` are never written.
    ``check(staged_path)``: called on the staged model before it is published; raising there
    leaves ``out`` as it was.
    """
    protected = [*(model_files(source) if source is not None else []), *protect]
    (out,) = files.check_targets([out], protected)
    model.ir_version = runtime_ir_version(model)
    if model.ir_version < 4:
        list_initializers_as_inputs(model)
    external = external or weights_size(model) >= _TWO_GB - (64 << 20)
    mode = files.mode_like(source)
    avoid = {files.real(p) for p in protected}
    replaced = [p for p in external_files(out) if p not in avoid] if out.is_file() else []
    published: list[Path] = []
    with files.os_errors(out), files.staging(out) as tmp:
        data_name = _data_name(out, avoid) if external else None
        staged = tmp / out.name
        if external:
            # Tensors are marked by hand: onnx's own conversion refuses when a file named like the
            # data file exists in the *working* folder (a rerun from the output folder).
            for tensor in model.graph.initializer:
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    external_data_helper.set_external_data(tensor, data_name)
        onnx.save_model(model, str(staged))  # with external data, the proto's weights move to the file
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{out}: the rewritten model fails onnx.checker ({first}); nothing written") from None
        staged_data = tmp / data_name if external and (tmp / data_name).exists() else None
        for path in (staged, staged_data):
            if path is not None:
                files.finish(path, mode)
        if check is not None:
            check(staged)
        try:
            if staged_data is not None:
                os.replace(staged_data, out.parent / data_name)
                published.append(out.parent / data_name)
            os.replace(staged, out)
            published.clear()
        finally:
            for orphan in published:  # interrupted between the two renames: the old model stands
                orphan.unlink(missing_ok=True)
        keep = {files.real(out.parent / data_name)} if external else set()
        for old in replaced:
            if old not in keep and old.parent == files.real(out).parent:
                old.unlink(missing_ok=True)
        files.sync_folder(files.real(out).parent)
    return out


MAX_DATA_ENV = "ONNX_MERGE_MAX_DATA_MB"
DEFAULT_MAX_DATA_MB = 1024  # what one .npz may unpack to: a zip of zeros inflates a thousandfold


def max_data_bytes() -> int:
    text = os.environ.get(MAX_DATA_ENV, "")
    try:
        return int(float(text) * 2**20) if text else DEFAULT_MAX_DATA_MB * 2**20
    except ValueError:
        raise UsageError(f"{MAX_DATA_ENV}={text!r}: expected a number of MiB") from None


def _npy_header(fh) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _, dtype = read(fh)
    return shape, dtype


def array_headers(path: Path, limit: int | None = None) -> dict[str, tuple[tuple, np.dtype]]:
    """Shape and dtype of every member of an .npz file, read from the headers only, with the
    checks that make reading it safe: no objects (pickles), no truncation, at most ``limit``
    bytes in all (default ``max_data_bytes()``)."""
    limit = max_data_bytes() if limit is None else limit
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        with open(path, "rb") as fh:
            if fh.read(6) == b"\x93NUMPY":
                raise ModelError(f"{path}: is a single .npy array; give an .npz file "
                                 "(numpy.savez(path, name=array), one array per graph input)") from None
        raise ModelError(f"{path}: not a readable .npz file (not a zip archive)") from None
    headers, total = {}, 0
    with archive:
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else None
            if key is None:
                raise ModelError(f"{path}: member {info.filename!r} is not a .npy array")
            try:
                with archive.open(info) as fh:
                    shape, dtype = _npy_header(fh)
                    header_bytes = fh.tell()
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError) as exc:
                raise ModelError(f"{path}: array {key!r} has no readable .npy header ({exc})") from None
            if dtype.hasobject:
                raise ModelError(f"{path}: array {key!r} holds Python objects (a pickle); refused")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if info.file_size < header_bytes + nbytes:
                raise ModelError(f"{path}: array {key!r} is truncated: its header says {dtype} {list(shape)} "
                                 f"({nbytes:,} bytes), the member holds {max(info.file_size - header_bytes, 0):,}")
            total += nbytes
            if total > limit:
                raise ModelError(f"{path}: array {key!r} ({dtype} {list(shape)}, {nbytes / 2**20:,.0f} MiB) takes "
                                 f"the file's arrays over the cap of {limit / 2**20:,.0f} MiB; set {MAX_DATA_ENV} "
                                 "to raise it")
            headers[key] = (shape, dtype)
    return headers


def load_arrays(path: str | os.PathLike, limit: int | None = None) -> dict[str, np.ndarray]:
    """Arrays of an .npz file, as a dict; headers checked first (``array_headers``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    headers = array_headers(path, limit)
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in headers:
                arrays[key] = data[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError) as exc:
        raise ModelError(f"{path}: array {key!r} cannot be read ({exc})") from None
    return arrays
