"""onnxruntime sessions: execution providers, inputs, batched runs."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import ModelError, UsageError

try:
    import onnxruntime as ort
except ImportError:  # onnxruntime comes with the [cpu] or [gpu] extra, never both
    ort = None
else:
    ort.disable_telemetry_events()  # it would write under ~/.cache on every run
    ort.set_default_logger_severity(4)  # its errors reach us as exceptions, named; no lines of its own

# onnxruntime logs from C++ straight to stderr; it may speak only when the user asked for logs
_SEVERITY = {"quiet": 4, "verbose": 2, "debug": 1}
_severity = _SEVERITY["quiet"]
# intra-op threads of the sessions this process makes when a caller names none (None: onnxruntime's
# default, every core). A sweep job sets its share of the cores, so that its compress and verify
# sessions do not compete with the other jobs for all of them.
_default_threads: int | None = None


@contextlib.contextmanager
def session_threads(threads: int | None):
    """Sessions made inside use ``threads`` intra-op threads unless told otherwise."""
    global _default_threads
    previous, _default_threads = _default_threads, threads
    try:
        yield
    finally:
        _default_threads = previous


def set_runtime_logging(level: str) -> None:
    """'quiet' (default), 'verbose' (-v: its warnings too) or 'debug'."""
    global _severity
    _severity = _SEVERITY[level]
    if ort is not None:
        ort.set_default_logger_severity(_severity)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def require_runtime():
    """onnxruntime, or a usage error saying how to install it."""
    if ort is None:
        raise UsageError("onnxruntime is not installed: pip install 'onnx-merge[cpu]' "
                         "(or 'onnx-merge[gpu]' on a CUDA machine)")
    return ort


def parse_providers(text: str | list[str] | None) -> list[str]:
    """'cpu,cuda' -> provider keys, refusing CUDA clearly when onnxruntime does not offer it."""
    require_runtime()
    if text is None:
        return ["cpu"]
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    for p in items:
        if p not in PROVIDERS:
            raise UsageError(f"unknown execution provider {p!r}; choose from {', '.join(PROVIDERS)}")
    if "cuda" in items and PROVIDERS["cuda"] not in ort.get_available_providers():
        raise UsageError("CUDA execution provider requested, but this onnxruntime offers only "
                         f"{', '.join(ort.get_available_providers())}; install onnx-merge[gpu] "
                         "(onnxruntime-gpu) on a machine with CUDA, or use --providers cpu")
    return list(dict.fromkeys(items)) or ["cpu"]


CPU_BLOCK_VARIABLE = "ONNX_MERGE_CPU_BLOCK"  # the deployment CPU's block, where it is not this machine's


def _cpu_conv_block() -> int:
    """onnxruntime's CPU kernels (MLAS) run convs in a blocked NCHWc layout of 16 channels with
    AVX-512, 8 with AVX2; a count off the block falls back to slower kernels. Elsewhere nothing
    was measured, and nothing is rounded. $ONNX_MERGE_CPU_BLOCK names the block of the CPU the
    model will run on when that is not the one compressing it."""
    given = os.environ.get(CPU_BLOCK_VARIABLE)
    if given:
        if not given.isdigit() or int(given) < 1:
            raise UsageError(f"${CPU_BLOCK_VARIABLE} must be a channel count such as 8 or 16, got {given!r}")
        return int(given)
    return _probed_cpu_block()


@functools.lru_cache(maxsize=None)
def _probed_cpu_block() -> int:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            features = {}
    return 16 if features.get("AVX512F") else 8 if features.get("AVX2") else 1


def channel_block(provider: str, op_type: str) -> int:
    """The channel count whose multiples ``provider``'s kernels for ``op_type`` run fastest at.
    CPU: convs in NCHWc blocks; a MatMul/Gemm showed no step (benchmarks/channel_steps.py).
    CUDA: tensor cores take multiples of 8 (not measured here)."""
    if provider == "cuda":
        return 8
    return _cpu_conv_block() if op_type in ("Conv", "ConvTranspose") else 1


OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                       "all": "ORT_ENABLE_ALL"}


def _options(optimize: bool | str, threads: int | None, once: bool, shared_pool: bool = False,
             profile: str | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    level = optimize if isinstance(optimize, str) else "all" if optimize else "disable"
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level])
    opts.log_severity_level = _severity
    if once:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if shared_pool:
        opts.use_per_session_threads = False
    elif threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def share_thread_pool(threads: int | None) -> None:
    """Give this process one onnxruntime thread pool of ``threads`` (None: onnxruntime's
    default), for the sessions made with ``shared_pool=True``. Call it before the first session:
    onnxruntime sizes the pool when it creates its environment."""
    require_runtime().capi._pybind_state.set_global_thread_pool_sizes(threads or 0, 1)


def _mapped_session(path: Path, opts: ort.SessionOptions, provider: str) -> ort.InferenceSession | None:
    """A session on the file's weights in place (wire.mapped_model); None where that does not
    apply or onnxruntime refuses it (the caller then loads the file as it is, and names the error)."""
    from .io import max_runtime_ir_version
    from .wire import mapped_model

    structure = mapped_model(path, ir_version=max_runtime_ir_version())
    if structure is None:
        return None
    # the folder of the path as given (not resolved): a linked model reads what its link's folder holds
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.absolute().parent))
    try:
        return ort.InferenceSession(structure, opts, providers=[PROVIDERS[provider]])
    except Exception:  # onnxruntime's own error types
        return None


def make_session(model: str | os.PathLike | bytes, provider: str = "cpu", *, optimize: bool | str = False,
                 threads: int | None = None, name: str | os.PathLike | None = None,
                 once: bool = False, in_place: bool = True, shared_pool: bool = False,
                 profile: str | None = None) -> ort.InferenceSession:
    """``optimize``: False (equality checks: no graph rewrites), True (everything, as deployed)
    or a level name from OPTIMIZATION_LEVELS. ``name``: what an error calls a model given as bytes.
    ``once``: a session that runs at most once (a dry run, a load check) does not pre-pack its
    weights for the kernels. ``in_place``: a file's embedded weights are read where they lie
    (wire.mapped_model: VGG-16's session in 0.01 s instead of 2.2, and no copy of its weights);
    False loads the file as a deployment would (bench times that). ``shared_pool``: run on the
    process's one thread pool (share_thread_pool) instead of a pool of the session's own.
    ``profile``: the path prefix of onnxruntime's profile of the session (end_profiling writes it)."""
    require_runtime()
    threads = threads or _default_threads
    if in_place and not isinstance(model, bytes):
        session = _mapped_session(Path(model), _options(optimize, threads, once, shared_pool, profile), provider)
        if session is not None:
            return session
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                    _options(optimize, threads, once, shared_pool, profile),
                                    providers=[PROVIDERS[provider]])
    except Exception as exc:  # onnxruntime's own error types
        lowered = _with_runtime_ir_version(model)
        if lowered is not None:
            return make_session(lowered, provider, optimize=optimize, threads=threads, name=name, once=once,
                                shared_pool=shared_pool, profile=profile)
        where = str(name or "model") if isinstance(model, bytes) else str(model)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: onnxruntime cannot load it ({first})") from None


def _with_runtime_ir_version(model) -> bytes | None:
    """The model re-serialized with an IR version onnxruntime accepts, when that is the obstacle.

    Only for models without external data (their relative paths need the file's folder).
    """
    import onnx

    from .io import max_runtime_ir_version

    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    except Exception:  # not a model at all: the original error stands
        return None
    if proto.ir_version <= max_runtime_ir_version() or any(t.data_location == onnx.TensorProto.EXTERNAL
                                                             for t in proto.graph.initializer):
        return None
    proto.ir_version = max_runtime_ir_version()
    return proto.SerializeToString()


def _concrete(shape, batch: int) -> list[int]:
    dims = []
    for i, d in enumerate(shape):
        dims.append(d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1))
    return dims


def random_inputs(session: ort.InferenceSession, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    from .io import MAX_DATA_ENV, max_data_bytes

    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        dtype = _NP_TYPES.get(inp.type)
        if dtype is None:
            raise ModelError(f"input {inp.name!r} has type {inp.type}, which random inputs cannot fill; use --inputs")
        shape = _concrete(inp.shape, batch)
        nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        if nbytes > max_data_bytes():  # checked before anything is drawn
            raise UsageError(f"random inputs for {inp.name!r} {shape} would take {nbytes / 2**20:,.0f} MiB, over the "
                             f"cap of {max_data_bytes() / 2**20:,.0f} MiB ({MAX_DATA_ENV}); lower --batch")
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


@dataclass
class InputSpec:
    """A graph input as onnxruntime describes one (name, dims with None or a name where free, type)."""

    name: str
    shape: list
    type: str


FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")  # inputs made-up or scaled data can stand for


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's data inputs, read from the file without building a session."""
    weights = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        specs.append(InputSpec(value.name, shape, f"tensor({onnx.TensorProto.DataType.Name(tensor.elem_type).lower()})"))
    return specs


def match_inputs(inputs: list, arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Arrays keyed by the input names (one array suffices for a one-input model), checked
    against each input's fixed dims. ``inputs``: a session's get_inputs() or graph_inputs()."""
    names = [i.name for i in inputs]
    if all(n in arrays for n in names):
        feeds = {n: arrays[n] for n in names}
    elif len(names) == 1 and len(arrays) == 1:
        feeds = {names[0]: next(iter(arrays.values()))}
    else:
        raise UsageError(f"{source}: needs arrays named {', '.join(names)}; found {', '.join(arrays) or 'none'}")
    for inp in inputs:
        array = np.asarray(feeds[inp.name])
        # the leading axis is the samples (run in the model's batch), every other fixed dim must match
        wrong = array.ndim != len(inp.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(inp.shape[1:], array.shape[1:]))
        if wrong:
            expected = ", ".join(str(d) if isinstance(d, int) else "?" for d in inp.shape)
            raise ModelError(f"{source}: array for input {inp.name!r} has shape {list(array.shape)}; "
                             f"the model takes [{expected}] (samples on the first axis)")
        dtype = _NP_TYPES.get(inp.type)
        feeds[inp.name] = array if dtype is None else array.astype(dtype, copy=False)
    if len({len(v) for v in feeds.values()}) > 1:
        raise ModelError(f"{source}: the arrays hold different numbers of samples "
                         f"({', '.join(f'{k}: {len(v)}' for k, v in feeds.items())})")
    return feeds


def run_checked(session: ort.InferenceSession, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list:
    """``session.run``, with a failure named as a ModelError (a model onnxruntime loads but cannot run)."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # onnxruntime's own error types
        where = getattr(session, "_model_path", None) or "the model"
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: onnxruntime cannot run it ({first})") from None


def dry_run(session: ort.InferenceSession) -> None:
    """Run the model once on random inputs when all its input dims but the batch are fixed (a free
    dim filled with 1 could be too small for the model: no verdict then). A ModelError names what
    onnxruntime cannot run."""
    if any(not isinstance(d, int) or d <= 0 for i in session.get_inputs() for d in i.shape[1:]):
        return
    try:
        feeds = random_inputs(session, batch=1)
    except (ModelError, UsageError):  # inputs random data cannot fill: verification will say so
        return
    run_checked(session, feeds)


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int = 64,
                progress=None) -> dict[str, np.ndarray]:
    """Run over the leading axis in chunks (a fixed batch dimension sets the chunk)."""
    first = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    if isinstance(first, int) and first > 0:
        batch = first
    total = len(next(iter(feeds.values())))
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list] = {n: [] for n in names}
    starts = range(0, total, batch)
    for start in (progress(starts, unit="batch") if progress else starts):
        part = {k: v[start:start + batch] for k, v in feeds.items()}
        for n, out in zip(names, run_checked(session, part, names)):
            chunks[n].append(out)
    return {n: np.concatenate(v) if v[0].ndim else v[0] for n, v in chunks.items()}
