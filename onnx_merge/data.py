"""Labelled evaluation data: .npz arrays or IDX files (MNIST/FashionMNIST), and preprocessing."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError, UsageError
from .io import load_arrays

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
    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "nchw"  # layout of the data; models take NCHW

    def __call__(self, x: np.ndarray, model_rank: int | None = None) -> np.ndarray:
        x = np.asarray(x, np.float32) / np.float32(self.scale)
        channel_axis = -1 if self.layout == "nhwc" else 1
        if x.ndim < 3:
            channel_axis = None
        for values, op in ((self.mean, np.subtract), (self.std, np.divide)):
            if values is None:
                continue
            v = np.asarray(values, np.float32)
            if v.size > 1 and channel_axis is not None:
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


def parse_floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}") from None
