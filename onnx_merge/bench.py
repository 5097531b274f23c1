"""Latency of several models in onnxruntime, run interleaved so that drift on the machine hits
every model alike; per configuration (batch, threads), with session creation time and the peak
memory of a session of each model.

The models take turns in blocks of runs (``block``, default 10), the first run of a block not
timed: a model served on its own finds its weights where its last run left them in the caches,
and run-by-run turns time every run just after another model has evicted them. On this 2-core
machine (32 MiB L3, two threads, three runs of each against blocks of 20) EfficientNet-B0
compressed to 0.69x its MACs took about 3.2 ms a run instead of 2.9 and the original 4.0 instead
of 3.8 (p50 ratio 0.80 instead of 0.76); ``block=1`` measures that case, a model served beside
others.

The models of one configuration share one thread pool, in a process of their own: with a pool
per session, the pool of the model that just ran keeps spinning for milliseconds and takes a core
from the next one. On two cores that made the paper's ResNet-56 at 2 threads time 1.27 ms instead
of 0.93, and its compressed copy come out slower than the original in one run, faster in another."""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import product

import numpy as np
from tqdm.auto import tqdm

from .io import load_model
from .runtime import make_session, random_inputs, run_checked, share_thread_pool
from .stats import count_macs, count_parameters
from .terminal import ratio_text

LEVELS = ("disable", "basic", "extended", "all")


def _footprint(path: str, provider: str, batch: int, threads: int | None, level: str) -> float:
    """Peak resident memory (MiB) of a fresh process that creates a session of ``path`` and runs
    it once: what deploying that model costs, apart from the interpreter itself."""
    session = make_session(path, provider, optimize=level, threads=threads, in_place=False)
    session.run(None, random_inputs(session, batch=batch))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(function, *args):
    """``function(*args)`` in a spawned process (one model per process, so figures do not mix);
    None where a process cannot be started."""
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(function, args)
    except (OSError, RuntimeError):
        return None


def peak_memory_mib(path: str, provider: str, batch: int, threads: int | None, level: str) -> float | None:
    """``_footprint`` in a process of its own; None where a process cannot be started."""
    mib = _in_child(_footprint, path, provider, batch, threads, level)
    return None if mib is None else float(mib)


def run_order(models: int, runs: int, block: int) -> list[tuple[int, bool]]:
    """(model, timed) in the order the runs happen: the models take turns, ``block`` timed runs
    each after one untimed run (which fills the caches for them, as a model served alone finds
    them); ``block`` 1 alternates run by run, every run timed. Each model gets
    ``runs`` timed runs; the last turn is shorter where ``block`` does not divide them."""
    if runs < 1 or block < 1:
        raise ValueError(f"runs and block must be at least 1, got {runs} and {block}")
    order = []
    for start in range(0, runs, block):
        for model in range(models):
            if block > 1:
                order.append((model, False))
            order += [(model, True)] * min(block, runs - start)
    return order


def turn_ratios(reference_ms, samples_ms, block: int) -> np.ndarray:
    """Each turn's median over the reference's median in the same turn (``run_order``: the i-th
    ``block`` of a model's timed runs was its i-th turn). Within a turn the machine's drift hits
    both models alike, so the spread of these ratios is the noise left in the p50 ratio."""
    reference, samples = np.asarray(reference_ms, np.float64), np.asarray(samples_ms, np.float64)
    turns = range(0, min(len(reference), len(samples)), block)
    return np.array([np.median(samples[t:t + block]) / np.median(reference[t:t + block]) for t in turns])


def ratio_interval(reference_ms, samples_ms, block: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """A bootstrap interval (percentile, over turns) of the median per-turn ratio: how far this
    run's noise leaves the p50 ratio uncertain. None with fewer than 5 turns."""
    from scipy.stats import bootstrap

    ratios = turn_ratios(reference_ms, samples_ms, block)
    if len(ratios) < 5:
        return None
    if np.ptp(ratios) == 0:
        return float(ratios[0]), float(ratios[0])
    found = bootstrap((ratios,), np.median, confidence_level=confidence, method="percentile", n_resamples=2000,
                      random_state=0).confidence_interval
    return float(found.low), float(found.high)


def kernel_times(events: list[dict], skip: int = 0) -> dict[str, float]:
    """Time per run (ms) of each onnxruntime op type, from a session profile's ``events``: each
    node's median over the runs it recorded after its first ``skip`` (warm-up), summed over the
    nodes of a type. The types are the kernels onnxruntime ran after its own rewrites (a Conv in
    NCHWc blocks, the reorders into and out of them, fused activations such as QuickGelu for
    x * sigmoid(x))."""
    per_node: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault((e["args"]["op_name"], e["name"]), []).append(e["dur"] / 1000)
    totals: dict[str, float] = {}
    for (op, _), durations in per_node.items():
        if durations[skip:]:
            totals[op] = totals.get(op, 0.0) + float(np.median(durations[skip:]))
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _profile(path: str, provider: str, batch: int, threads: int | None, level: str, runs: int, warmup: int
             ) -> dict[str, float]:
    """kernel_times of ``runs`` profiled runs of one model, after ``warmup`` runs the profile
    records too and kernel_times leaves out."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnx-merge-profile-") as folder:
        session = make_session(path, provider, optimize=level, threads=threads, in_place=False,
                               profile=os.path.join(folder, "profile"))
        feeds = random_inputs(session, batch=batch)
        for _ in range(warmup + runs):
            run_checked(session, feeds)
        with open(session.end_profiling()) as f:
            return kernel_times(json.load(f), skip=warmup)


def _time_config(paths, provider: str, batch: int, threads: int | None, level: str, runs: int, warmup: int,
                 block: int, shared_pool: bool):
    created, sessions = [], []
    for p in paths:
        start = time.perf_counter()
        sessions.append(make_session(p, provider, optimize=level, threads=threads, in_place=False,
                                     shared_pool=shared_pool))
        created.append(time.perf_counter() - start)
    feeds = [random_inputs(s, batch=batch) for s in sessions]
    # a batch dimension fixed at export stays as it is: report the batch that was run
    fed = [next(iter(f.values())).shape[0] if f and next(iter(f.values())).ndim else 1 for f in feeds]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            run_checked(s, f)
    times = [[] for _ in paths]
    for i, timed in tqdm(run_order(len(paths), runs, block), desc=f"batch {batch}, threads {threads or 'default'}",
                         unit="run", leave=False, disable=None):
        start = time.perf_counter()
        run_checked(sessions[i], feeds[i])
        if timed:
            times[i].append(time.perf_counter() - start)
    return created, times, fed


def _time_config_apart(paths, provider: str, batch: int, threads: int | None, level: str, runs: int, warmup: int,
                       block: int):
    """``_time_config`` in a spawned process whose one thread pool all the models run on; in this
    process, with a pool per session, where no process can be started."""
    args = (paths, provider, batch, threads, level, runs, warmup, block)
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=share_thread_pool,
                                   initargs=(threads,))
    except (OSError, RuntimeError):
        return _time_config(*args, shared_pool=False)
    with pool:  # shut down, not terminated: the child's progress bar lets go of its lock
        return pool.submit(_time_config, *args, shared_pool=True).result()


def bench_models(paths: list[str | os.PathLike], *, provider: str = "cpu", batches: tuple[int, ...] = (1,),
                 threads: tuple[int | None, ...] = (None,), level: str = "all", runs: int = 50, warmup: int = 5,
                 block: int = 10, memory: bool = True, profile: bool = False) -> list[dict]:
    """One row per model and (batch, threads) configuration; ``p50_ratio`` is each model's p50
    over the first model's in the same configuration, ``macs`` counts the whole batch that ran
    (a batch dimension fixed at export is not changed). ``block``: timed runs of a model in a row
    (run_order). ``profile``: each row's ``op_ms`` also holds its time per op type (kernel_times),
    profiled apart from the timed runs (profiling slows every node a little)."""
    paths = [str(p) for p in paths]
    counts = []
    for p in paths:
        model = load_model(p).model
        counts.append((count_parameters(model), count_macs(model)))
    mib = {(p, b): peak_memory_mib(p, provider, b, threads[0], level) if memory else None
           for p in paths for b in batches}
    results = []
    for batch, t in product(batches, threads):
        created, times, fed = _time_config_apart(paths, provider, batch, t, level, runs, warmup, block)
        rows = []
        for path, made, samples, (params, macs), ran in zip(paths, created, times, counts, fed):
            ms = 1000 * np.asarray(samples)
            rows.append({"model": path, "provider": provider, "batch": ran, "threads": t, "level": level,
                         "runs": runs, "block": block, "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                         "p99_ms": float(np.percentile(ms, 99)), "samples_ms": [float(v) for v in ms],
                         "throughput_per_s": float(ran / np.median(samples)), "session_create_s": made,
                         "peak_memory_mib": mib[(path, batch)], "params": params,  # measured at the batch asked
                         "macs": macs * ran if macs is not None else None})
        if profile:
            for r in rows:
                args = (r["model"], provider, batch, t, level, runs, warmup)
                found = _in_child(_profile, *args)
                r["op_ms"] = _profile(*args) if found is None else found
        for r in rows:
            r["p50_ratio"] = r["p50_ms"] / rows[0]["p50_ms"]
            r["p50_ratio_interval"] = None if r is rows[0] else ratio_interval(rows[0]["samples_ms"], r["samples_ms"], block)
            r["macs_ratio"] = r["macs"] / rows[0]["macs"] if r["macs"] and rows[0]["macs"] else None
        results += rows
    return results


SLOWER_THAN_MACS = 1.15  # a latency ratio this far above the MAC ratio is worth a warning


def latency_warnings(rows: list[dict]) -> list[str]:
    """What a user who compressed to run faster should hear: a configuration where the result is
    not faster than the original (the first model), or lags its MAC reduction by over 15 %."""
    found = []
    for r in rows:
        if r["model"] == rows[0]["model"]:
            continue
        where = f"batch {r['batch']}, threads {r['threads'] or 'default'}"
        if r["p50_ratio"] >= 1.0:
            found.append(f"not faster than the original at {where}: p50 latency {ratio_text(r)}")
        elif r["macs_ratio"] and r["p50_ratio"] > SLOWER_THAN_MACS * r["macs_ratio"]:
            found.append(f"latency lags the MACs at {where}: p50 {ratio_text(r)} the original's at "
                         f"{r['macs_ratio']:.2f}x its MACs")
    return found


def op_table(rows: list[dict], top: int = 12) -> tuple[list[str], list[list]]:
    """(headers, rows) of the profiled time per op type of one configuration's models (``rows``,
    the first the reference): the ``top`` op types the reference spends most on, each with its
    share of the reference's kernel time and every other model's time as a ratio to it, so that
    the ops whose time did not shrink with the MACs stand out."""
    first = rows[0]["op_ms"] or {}
    total = sum(first.values()) or 1.0
    headers = ["op type", f"{os.path.basename(rows[0]['model'])} ms", "share"]
    headers += [f"{os.path.basename(r['model'])} ms (ratio)" for r in rows[1:]]
    ops = list(first)[:top]
    table = []
    for op in ops + ["all kernels"]:
        ms = sum(first.values()) if op == "all kernels" else first[op]
        cells = [op, f"{ms:.3f}", f"{ms / total:.0%}"]
        for r in rows[1:]:
            times = r["op_ms"] or {}
            other = sum(times.values()) if op == "all kernels" else times.get(op)
            cells.append("-" if other is None else f"{other:.3f} ({other / ms:.2f})" if ms else f"{other:.3f}")
        table.append(cells)
    return headers, table


def plot_latencies(results: list[dict]) -> bytes:
    """Box plots of every run's latency, one panel per configuration, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((r["provider"], r["batch"], r["threads"]) for r in results))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.6), squeeze=False)
    for ax, (provider, batch, threads) in zip(axes[0], configs):
        rows = [r for r in results if (r["provider"], r["batch"], r["threads"]) == (provider, batch, threads)]
        ax.boxplot([r["samples_ms"] for r in rows], showfliers=False)
        ax.set_xticks(range(1, len(rows) + 1), [os.path.basename(r["model"]) for r in rows], rotation=20, fontsize=7)
        ax.set_title(f"{provider}, batch {batch}, threads {threads or 'default'}", fontsize=9)
        ax.set_ylabel("latency (ms)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()
