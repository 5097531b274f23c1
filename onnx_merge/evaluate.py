"""Top-1 / top-5 accuracy of a model on a labelled array set."""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from .data import Preprocess
from .errors import UsageError
from .runtime import make_session, run_batched


def accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def evaluate(model: str | os.PathLike | bytes, x: np.ndarray, y: np.ndarray, preprocess: Preprocess | None = None,
             *, batch: int = 256, provider: str = "cpu", progress: bool = True, source: str = "data",
             threads: int | None = None) -> dict:
    if len(x) != len(y):
        raise UsageError(f"{len(x)} inputs but {len(y)} labels")
    session = make_session(model, provider, optimize=True, threads=threads)
    inp = session.get_inputs()[0]
    x = (preprocess or Preprocess())(x, len(inp.shape), source)
    bar = (lambda it, **kw: tqdm(it, desc="evaluating", leave=False, disable=None, **kw)) if progress else None
    logits = next(iter(run_batched(session, {inp.name: x}, batch=batch, progress=bar).values()))
    logits = logits.reshape(len(x), -1)
    labels = np.asarray(y).astype(np.int64).reshape(-1)
    result = {"samples": int(len(x)), "top1": accuracy(logits, labels, 1)}
    if logits.shape[1] > 5:
        result["top5"] = accuracy(logits, labels, 5)
    return result
