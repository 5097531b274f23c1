"""Labelled evaluation data: .npz arrays or IDX files (MNIST/FashionMNIST), and preprocessing."""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError, UsageError
from .io import load_arrays

log = logging.getLogger("onnx_merge")

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (optionally gzipped): magic 0x0000TTDD, DD big-endian uint32 dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ModelError(f"{path}: not an IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ModelError(f"{path}: IDX header says {tuple(dims)}, file holds {data.size} values")
    return data.reshape(dims)


def load_idx_dir(folder: str | Path, split: str = "t10k") -> dict[str, np.ndarray]:
    folder = Path(folder)
    found = {}
    for key, stem in (("x", f"{split}-images-idx3-ubyte"), ("y", f"{split}-labels-idx1-ubyte")):
        for cand in (folder / f"{stem}.gz", folder / stem):
            if cand.is_file():
                found[key] = read_idx(cand)
                break
        else:
            raise ModelError(f"{folder}: no {stem}[.gz]")
    return found


def load_data(spec: str) -> dict[str, np.ndarray]:
    """``FILE.npz``, ``idx:DIR`` (test split) or ``idx:DIR:train``."""
    if spec.startswith("idx:"):
        parts = spec[4:].split(":")
        return load_idx_dir(parts[0], parts[1] if len(parts) > 1 else "t10k")
    return load_arrays(spec)


@dataclass
class Preprocess:
    """How stored arrays become model inputs: ``x / scale``, minus ``mean``, over ``std`` (per
    channel when several values are given), NHWC data moved to NCHW, and the rank the model takes
    (flattened for a rank-2 input, a channel axis added for 3-dim images into a rank-4 one).

    ``scale`` None: not given. uint8 data is then fed as it is, with a warning: raw 0..255
    pixels into a model trained on [0, 1] or normalised inputs score like chance.
    """

    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "nchw"  # layout of the data; models take NCHW

    def __call__(self, x: np.ndarray, model_rank: int | None = None, source: str = "data") -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == np.uint8 and self.scale is None:
            log.warning("%s holds uint8 values (0..255) and no --scale was given: they are fed as they are; "
                        "pass --scale 255 (with --mean/--std as the model was trained), or --scale 1 to keep them",
                        source)
        x = x.astype(np.float32) / np.float32(1.0 if self.scale is None else self.scale)
        channel_axis = -1 if self.layout == "nhwc" else 1
        if x.ndim < 3:
            channel_axis = None
        for values, op in ((self.mean, np.subtract), (self.std, np.divide)):
            if values is None:
                continue
            v = np.asarray(values, np.float32)
            if v.size > 1 and channel_axis is not None:
                if x.shape[channel_axis] != v.size:
                    raise UsageError(f"{source}: {v.size} per-channel values for {x.shape[channel_axis]} channels "
                                     f"(data shape {list(x.shape)}, --layout {self.layout})")
                shape = [1] * x.ndim
                shape[channel_axis] = v.size
                v = v.reshape(shape)
            x = op(x, v)
        if self.layout == "nhwc" and x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        if model_rank is not None:
            if model_rank == 2 and x.ndim > 2:
                x = x.reshape(len(x), -1)
            elif model_rank == 4 and x.ndim == 3:
                x = x[:, None]
        return np.ascontiguousarray(x, np.float32)

    def validate(self) -> "Preprocess":
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f"--scale must be a positive number, got {self.scale}")
        if self.std is not None and not all(np.isfinite(v) and v > 0 for v in self.std):
            raise UsageError(f"--std values must be positive, got {', '.join(map(str, self.std))}")
        if self.mean is not None and not all(np.isfinite(v) for v in self.mean):
            raise UsageError(f"--mean values must be numbers, got {', '.join(map(str, self.mean))}")
        if self.layout not in ("nchw", "nhwc"):
            raise UsageError(f"--layout must be nchw or nhwc, got {self.layout!r}")
        return self


def prepare_inputs(arrays: dict[str, np.ndarray], specs: list, preprocess: Preprocess | None = None,
                   input_key: str | None = None, source: str = "data") -> dict[str, np.ndarray]:
    """Arrays of a data file as feeds for a model whose inputs are ``specs`` (graph_inputs()).

    ``input_key`` picks the array of a one-input model; otherwise arrays go by input name (or
    the only array to the only input). Floating-point inputs are preprocessed; integer inputs
    (token ids, masks) pass as they are. Shapes are checked by runtime.match_inputs.
    """
    from .runtime import FLOAT_TYPES, match_inputs

    if input_key is not None:
        if input_key not in arrays:
            raise UsageError(f"{source}: no array {input_key!r} (found {', '.join(arrays) or 'none'})")
        if len(specs) != 1:
            raise UsageError(f"{source}: --input-key picks one array, the model takes {len(specs)} inputs "
                             f"({', '.join(s.name for s in specs)}): name the arrays after them")
        arrays = {specs[0].name: arrays[input_key]}
    names = [s.name for s in specs]
    if not all(n in arrays for n in names) and len(names) == 1:
        if len(arrays) != 1:
            raise UsageError(f"{source}: no array named {names[0]!r} (found {', '.join(arrays) or 'none'}); "
                             "pick one with --input-key")
        arrays = {names[0]: next(iter(arrays.values()))}
    pre = preprocess or Preprocess()
    feeds = dict(arrays)
    for spec in specs:
        if spec.name in feeds and spec.type in FLOAT_TYPES:
            rank = len(spec.shape) if _fits_reshaped(np.shape(feeds[spec.name]), spec.shape) else None
            feeds[spec.name] = pre(feeds[spec.name], rank, f"{source} [{spec.name}]")
    return match_inputs(specs, feeds, source)


def _fits_reshaped(data_shape: tuple, model_shape: list) -> bool:
    """Whether images flattened for a rank-2 input, or given a channel axis for a rank-4 one,
    match the model's fixed dims (otherwise the data's own shape is what the error names)."""
    if len(model_shape) == 2 and len(data_shape) > 2:
        return not isinstance(model_shape[1], int) or int(np.prod(data_shape[1:])) == model_shape[1]
    if len(model_shape) == 4 and len(data_shape) == 3:
        return not isinstance(model_shape[1], int) or model_shape[1] == 1
    return True


def parse_floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}") from None
