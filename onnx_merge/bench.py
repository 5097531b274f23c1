"""Latency of several models in onnxruntime (graph optimizations on), run interleaved so that
drift on the machine hits every model alike."""

from __future__ import annotations

import os
import time

import numpy as np
from tqdm.auto import tqdm

from .io import load_model
from .runtime import make_session, random_inputs, run_checked
from .stats import count_macs, count_parameters


def bench_models(paths: list[str | os.PathLike], *, provider: str = "cpu", batch: int = 1, threads: int | None = None,
                 runs: int = 50, warmup: int = 5) -> list[dict]:
    sessions = [make_session(p, provider, optimize=True, threads=threads) for p in paths]
    feeds = [random_inputs(s, batch=batch) for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            run_checked(s, f)
    times = [[] for _ in paths]
    for _ in tqdm(range(runs), desc="benchmarking", unit="round", leave=False, disable=None):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            run_checked(s, f)
            times[i].append(time.perf_counter() - start)
    results = []
    for path, t in zip(paths, times):
        model = load_model(path).model
        ms = 1000 * np.asarray(t)
        results.append({"model": str(path), "provider": provider, "batch": batch, "threads": threads, "runs": runs,
                        "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                        "p99_ms": float(np.percentile(ms, 99)),
                        "throughput_per_s": float(batch / np.median(np.asarray(t))),
                        "params": count_parameters(model), "macs": count_macs(model)})
    for r in results:
        r["p50_ratio"] = r["p50_ms"] / results[0]["p50_ms"]
    return results
