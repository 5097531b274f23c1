"""Random inputs that mean something, for checking a model when no data is given.

- ``n`` samples (default CHECK_SAMPLES): with 2, top-1 agreement can only be 0, 0.5 or 1.
- Dynamic dims take the user's ``--input-shape NAME=1x3x224x224`` (a dim named in one input,
  such as a sequence length, takes the same value in every input naming it); a dynamic dim
  nobody set is DEFAULT_DIM, with a warning (1 would check an image model on 1x1 pixels).
- Integer inputs that index an embedding (a Gather reading an initializer, maybe through
  Cast/Reshape/Unsqueeze) are drawn over the embedding's rows; other integer inputs (masks,
  token types) are 0 or 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import ModelError, UsageError

log = logging.getLogger("onnx_merge")

CHECK_SAMPLES = 16
DEFAULT_DIM = 32
_NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
_INDEX_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def parse_input_shape(text: str) -> tuple[str | None, list[int]]:
    """``NAME=1x3x224x224`` (or ``1x3x224x224`` for a one-input model) -> (name, dims)."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape) or (sep and not name):
        raise UsageError(f"--input-shape: expected NAME=1x3x224x224 (positive dims), got {text!r}")
    return (name or None), shape


def resolve_input_shapes(specs: list, given: list[tuple[str | None, list[int]]]) -> tuple[dict, list[str]]:
    """Input name -> dims with batch 1 and every dim a number, and what was guessed.

    ``specs``: graph_inputs() or a session's get_inputs() (name, shape, type).
    """
    names = [s.name for s in specs]
    user = {}
    for name, dims in given:
        if name is None:
            if len(names) != 1:
                raise UsageError(f"--input-shape: name the input ({', '.join(names)}), as NAME=1x3x224x224")
            name = names[0]
        if name not in names:
            raise UsageError(f"--input-shape: the model has no input {name!r} (inputs: {', '.join(names)})")
        user[name] = dims
    symbols = {}
    for spec in specs:
        dims = user.get(spec.name)
        if dims is None:
            continue
        if len(dims) != len(spec.shape):
            raise UsageError(f"--input-shape {spec.name}: {len(dims)} dims given, the input has {len(spec.shape)}")
        for i, (d, n) in enumerate(zip(spec.shape, dims)):
            if isinstance(d, int) and d > 0 and i > 0 and d != n:
                raise UsageError(f"--input-shape {spec.name}: dim {i} is fixed at {d} in the model, got {n}")
            if isinstance(d, str):
                symbols[d] = n
    shapes, guessed = {}, []
    for spec in specs:
        dims = list(user.get(spec.name, []))
        if not dims:
            for i, d in enumerate(spec.shape):
                if isinstance(d, int) and d > 0:
                    dims.append(d)
                elif i == 0:
                    dims.append(1)
                elif isinstance(d, str) and d in symbols:
                    dims.append(symbols[d])
                else:
                    dims.append(DEFAULT_DIM)
                    guessed.append(f"{spec.name}[{i}]")
        shapes[spec.name] = [1] + dims[1:] if dims else []
    return shapes, guessed


def embedding_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> rows of the smallest embedding table its values index (through Gather)."""
    inputs = {i.name for i in model.graph.input}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    rows: dict[str, int] = {}
    for start in inputs - set(weights):
        frontier, seen = [start], set()
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node in readers.get(tensor, []):
                if node.op_type in _INDEX_PASSTHROUGH and node.input[0] == tensor:
                    frontier.extend(node.output)
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor \
                        and node.input[0] in weights:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    table = weights[node.input[0]]
                    if table and -len(table) <= axis < len(table):
                        rows[start] = min(rows.get(start, table[axis]), table[axis])
    return rows


def _load_proto(source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, bytes):
        return onnx.load_from_string(source)
    return onnx.load(str(source), load_external_data=False)


@dataclass
class CheckData:
    """How random check data is made: ``samples`` of each input at ``input_shapes`` (parsed
    --input-shape values), seeded."""

    samples: int = CHECK_SAMPLES
    input_shapes: list[tuple[str | None, list[int]]] = field(default_factory=list)
    seed: int = 0

    def feeds(self, model, specs: list) -> tuple[dict[str, np.ndarray], dict]:
        """(input name -> array, a description for the report) for ``model`` (path, bytes or
        proto) whose inputs are ``specs``."""
        if self.samples < 1:
            raise UsageError(f"--check-n must be at least 1, got {self.samples}")
        shapes, guessed = resolve_input_shapes(specs, self.input_shapes)
        if guessed:
            log.warning("dynamic dims %s set to %d for the check; pass --input-shape NAME=1x3x224x224 to choose",
                        ", ".join(guessed), DEFAULT_DIM)
        samples = self.samples
        for spec in specs:  # a fixed batch dim runs in chunks of that size: fill whole chunks
            if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 1:
                samples = -(-samples // spec.shape[0]) * spec.shape[0]
        rng = np.random.default_rng(self.seed)
        integer = [s for s in specs if s.type in _NP_TYPES and not np.issubdtype(_NP_TYPES[s.type], np.floating)
                   and _NP_TYPES[s.type] is not np.bool_]
        rows = embedding_rows(_load_proto(model)) if integer else {}
        feeds, ranges = {}, {}
        for spec in specs:
            dtype = _NP_TYPES.get(spec.type)
            if dtype is None:
                raise ModelError(f"input {spec.name!r} has type {spec.type}, which random inputs cannot fill; "
                                 "use --inputs")
            shape = [samples] + shapes[spec.name][1:] if shapes[spec.name] else []
            if np.issubdtype(dtype, np.floating):
                feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype is np.bool_:
                feeds[spec.name] = rng.random(shape) < 0.5
            else:
                high = rows.get(spec.name, 2)
                ranges[spec.name] = [0, high - 1]
                feeds[spec.name] = rng.integers(0, high, size=shape).astype(dtype)
        info = {"source": "random", "samples": samples, "shapes": {k: list(v.shape) for k, v in feeds.items()}}
        if ranges:
            info["integer_ranges"] = ranges
        if guessed:
            info["guessed_dims"] = guessed
        return feeds, info
