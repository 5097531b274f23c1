"""Sweeps: every model x method x setting compressed, checked, scored (and timed), one job each.

A job reads the model and data by path and writes its own result, ``DIR/jobs/KEY.json``, where KEY
hashes the configuration and the contents of the files it reads; a rerun serves those from the cache
and runs only what is missing or failed. Jobs run on an engine (``engines``: a process pool or Ray);
``sweep_output`` writes the table, CSV and picture, and ``pick`` chooses a configuration.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import operator
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from . import __version__
from .errors import UsageError
from .io import load_calibration, load_model, model_files, save_model, write_text_atomic
from .options import DATA_FREE, SYNTHETIC

log = logging.getLogger("onnx_merge")

ORIGINAL = "original"  # the method name of each model's uncompressed row
VERIFY_SAMPLES = 64  # eval samples the compressed model is compared with the original on
MINIMIZE = {"macs": "macs", "params": "params", "latency": "latency_ms"}
FIGURES = ("accuracy", "accuracy_drop", "top5", "samples", "params", "params_kept", "macs", "macs_kept", "cosine",
           "top1_agreement", "latency_ms", "latency_ratio", "seconds")  # what a finished row can be judged on


@dataclass(frozen=True)
class EvalSpec:
    """Labelled data and its preprocessing, as ``onnx-merge eval`` takes them."""

    data: str
    input_key: str = "x"
    label_key: str = "y"
    limit: int | None = None
    scale: float | None = None  # None: not given (uint8 data is then fed as it is, with a warning)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "nchw"
    batch: int = 256

    def __post_init__(self):
        object.__setattr__(self, "data", str(self.data))  # a path given as Path: it keys the file hashes

    def load(self):
        """Inputs, labels (cut to the inputs, as eval does) and the preprocessing."""
        from .data import Preprocess, load_data

        arrays = load_data(self.data)
        for key in (self.input_key, self.label_key):
            if key not in arrays:
                raise UsageError(f"{self.data}: no array {key!r} (found {', '.join(arrays)})")
        x = arrays[self.input_key][:self.limit] if self.limit else arrays[self.input_key]
        y = arrays[self.label_key][:len(x)]
        return x, y, Preprocess(self.scale, self.mean, self.std, self.layout).validate()


@dataclass(frozen=True)
class BenchSpec:
    batch: int = 1
    runs: int = 50
    warmup: int = 5


@dataclass
class Job:
    """One configuration: ``method`` None evaluates the model as it is (the baseline of its rows)."""

    model: str
    method: str | None
    setting: dict  # the swept CompressOptions fields, e.g. {"ratio": 0.3}
    evaluation: EvalSpec
    out: str
    calibration: str | None = None
    bench: BenchSpec | None = None
    threads: int = 1
    fingerprints: dict = field(default_factory=dict)  # path -> content hash

    @property
    def key(self) -> str:
        config = {"version": __version__, "code": code_fingerprint(), "model": self.fingerprints[self.model], "method": self.method,
                  "setting": self.setting, "calibration": self.calibration and self.fingerprints[self.calibration],
                  "evaluation": {**asdict(self.evaluation), "data": self.fingerprints[self.evaluation.data]},
                  "bench": self.bench and asdict(self.bench)}
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        setting = " ".join(f"{k}={v}" for k, v in self.setting.items())
        return f"{Path(self.model).stem} {self.method or ORIGINAL}{' ' + setting if setting else ''}"

    def path(self, kind: str) -> Path:
        return Path(self.out) / "jobs" / f"{self.key}.{kind}"

    def row(self, **figures) -> dict:
        return {"label": self.label, "model": self.model, "method": self.method or ORIGINAL, **self.setting,
                "key": self.key, **figures}

    def failed(self, exc: BaseException) -> dict:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        return self.row(status="error", error=message[:500])


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 of onnx-merge's own sources: results made by other code are not served from the cache."""
    from . import passes

    digest = hashlib.sha256()
    for folder in sorted({Path(__file__).parent, *map(Path, passes.__path__)}):
        for f in sorted(folder.rglob("*.py")):
            digest.update(f.read_bytes())
    return digest.hexdigest()


def _files_read(spec: str) -> list[Path]:
    """The files a model or data spec reads: a model's external data too; every file of an ``idx:DIR``."""
    if spec.startswith("idx:"):
        return sorted(f for f in Path(spec[4:].split(":")[0]).iterdir() if f.is_file())
    return model_files(spec) if spec.endswith(".onnx") else [Path(spec)]


def fingerprint(spec: str) -> str:
    """SHA-256 of the spec's file contents (and of an ``idx:`` spec itself, whose split matters;
    of "synthetic" or "none" alone: they read no file)."""
    if spec in (SYNTHETIC, DATA_FREE):
        return hashlib.sha256(spec.encode()).hexdigest()
    digest = hashlib.sha256(spec.encode() if spec.startswith("idx:") else b"")
    for f in _files_read(spec):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _job_log(path: Path):
    """The job's log lines and any progress bars go to its own file, not the sweep's terminal."""
    with open(path, "w") as stream, contextlib.redirect_stderr(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        root, previous = logging.getLogger(), log.level
        root.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            yield
        finally:
            log.setLevel(previous)
            root.removeHandler(handler)


def _score(job: Job, model_path: Path, x, y, pre) -> dict:
    from .evaluate import evaluate

    result = evaluate(model_path, x, y, pre, batch=job.evaluation.batch, progress=False, threads=job.threads)
    figures = {"accuracy": 100 * result["top1"], "samples": result["samples"]}
    if "top5" in result:
        figures["top5"] = 100 * result["top5"]
    return figures


def _compress(job: Job, x, pre) -> dict:
    from .api import compress_file
    from .options import CompressOptions
    from .runtime import graph_inputs
    from .verify import verify_models

    calibration = load_calibration(job.calibration)
    options = CompressOptions(method=job.method, calibration=calibration, **job.setting)
    dst = Path(job.out) / "models" / f"{job.label.replace(' ', '-').replace('=', '')}-{job.key[:8]}.onnx"
    report = compress_file(job.model, dst, options, verify=False)
    spec = graph_inputs(load_model(job.model).model)[0]
    check = {spec.name: pre(x[:VERIFY_SAMPLES], len(spec.shape))}
    outputs = verify_models(job.model, dst, inputs=check, tolerance=None, input_source="the eval data").as_dict()
    first = next(iter(outputs["providers"]["cpu"].values()))
    return {"output": str(dst), "params": report["params_after"], "macs": report["macs_after"],
            "params_before": report["params_before"], "macs_before": report["macs_before"],
            "cosine": first["cosine"], "top1_agreement": first.get("top1_agreement")}


def run_job(job: Job) -> dict:
    """Compress, verify, score and optionally time one configuration; never raises: a failure is
    the row's ``error``. The row is also written to the job's JSON file, for the cache."""
    from .bench import bench_models
    from .runtime import session_threads
    from .stats import count_macs, count_parameters

    start = time.perf_counter()
    job.path("json").parent.mkdir(parents=True, exist_ok=True)
    with _job_log(job.path("log")), session_threads(job.threads):
        try:
            x, y, pre = job.evaluation.load()
            if job.method is None:
                model = load_model(job.model).model
                figures = {"output": job.model, "params": count_parameters(model), "macs": count_macs(model)}
            else:
                figures = _compress(job, x, pre)
            figures.update(_score(job, Path(figures["output"]), x, y, pre))
            if job.bench:
                timed = [job.model] if job.method is None else [job.model, figures["output"]]
                runs = bench_models(timed, batches=(job.bench.batch,), threads=(job.threads,), runs=job.bench.runs,
                                    warmup=job.bench.warmup, memory=False)
                figures.update(latency_ms=runs[-1]["p50_ms"], latency_ratio=runs[-1]["p50_ratio"])
            row = job.row(status="ok", **figures)
        except Exception as exc:  # any failure belongs to this job's row; the sweep goes on
            traceback.print_exc()
            row = job.failed(exc)
    row["seconds"] = round(time.perf_counter() - start, 2)
    write_text_atomic(job.path("json"), json.dumps(row, indent=2))
    return row


def cached_row(job: Job) -> dict | None:
    """The job's earlier result, if it finished well."""
    try:
        row = json.loads(job.path("json").read_text())
    except (OSError, ValueError):
        return None
    if row.get("status") != "ok" or row.get("key") != job.key or not Path(row.get("output", "")).is_file():
        return None
    return {**row, **job.row(), "cached": True}


def _with_baseline(rows: list[dict]) -> list[dict]:
    """Accuracy drop (points) and the fractions of parameters and MACs kept, against each model's original."""
    base = {r["model"]: r for r in rows if r["method"] == ORIGINAL and r["status"] == "ok"}
    for r in rows:
        b = base.get(r["model"])
        if r["status"] != "ok":
            continue
        if b is not None:
            r["accuracy_drop"] = b["accuracy"] - r["accuracy"]
        params_before = r.get("params_before") or (b or r)["params"]
        macs_before = r.get("macs_before") or (b or r)["macs"]
        r["params_kept"] = r["params"] / params_before if params_before else None
        r["macs_kept"] = r["macs"] / macs_before if macs_before and r["macs"] is not None else None
    return rows


_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>|==)\s*([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)\s*$", re.I)
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


def parse_constraints(text: str, settings: tuple[str, ...] = ("ratio",)) -> list[tuple[str, str, float]]:
    """'accuracy_drop<=1.0,latency_ratio<0.8' -> [(field, op, value), ...]; fields are FIGURES or ``settings``."""
    out = []
    for part in text.split(","):
        match = _CONSTRAINT.match(part)
        if not match:
            raise UsageError(f"--pick: expected FIELD<=VALUE (also <, >=, >, ==), comma-separated; got {part!r}")
        if match[1] not in FIGURES + settings:
            raise UsageError(f"--pick: no figure {match[1]!r}; choose from {', '.join(FIGURES + settings)}")
        out.append((match[1], match[2], float(match[3])))
    return out


def pick(rows: list[dict], constraints: str, minimize: str) -> dict:
    """The compressed row meeting every constraint with the least ``minimize`` (ties: higher
    accuracy), and a sentence saying why. ``row`` is None when no row meets them."""
    settings = tuple(k for r in rows for k in r if k not in FIGURES and isinstance(r[k], (int, float)))
    conditions = parse_constraints(constraints, settings)
    if minimize not in MINIMIZE:
        raise UsageError(f"--minimize must be one of {', '.join(MINIMIZE)}, got {minimize!r}")
    target = MINIMIZE[minimize]
    done = [r for r in rows if r["status"] == "ok" and r["method"] != ORIGINAL]
    if done and target not in done[0]:
        raise UsageError(f"--minimize {minimize} needs figures the sweep did not take (latency: --bench)")
    meets = [r for r in done if all(r.get(n) is not None and _OPS[op](r[n], v) for n, op, v in conditions)
             and r.get(target) is not None]
    if not meets:
        return {"row": None, "why": f"no configuration of {len(done)} meets {constraints}"}
    best = min(meets, key=lambda r: (r[target], -r["accuracy"]))
    figures = ", ".join(f"{n} {best[n]:.4g}" for n, _, _ in conditions)
    value = f"{best[target]:.3f} ms" if minimize == "latency" else f"{best[target]:,}"
    kept = best.get(f"{minimize}_kept") if minimize != "latency" else best.get("latency_ratio")
    share = f", {100 * kept:.1f} % of the original" if kept is not None else ""
    why = (f"{best['label']}: {figures} meets {constraints}; the least {minimize} ({value}{share}) of the "
           f"{len(meets)} of {len(done)} configurations that meet it (top-1 {best['accuracy']:.2f} %)")
    return {"row": best, "why": why}


@dataclass
class SweepResult:
    rows: list[dict]
    files: dict  # kind -> path written
    ran: int  # jobs run (the others came from the cache)
    seconds: float
    options: dict = field(default_factory=dict)  # as the report records them
    pick: dict | None = None


def plan_jobs(models: list[str], methods: list[str], settings: list[dict], evaluation: EvalSpec, out: str, *,
              calibration: str | None = None, bench: BenchSpec | None = None, threads: int = 1) -> list[Job]:
    """Each model's baseline, then every method x setting, in that order; files checked and hashed."""
    from .options import CompressOptions

    for method in methods:
        for setting in settings:
            CompressOptions(method=method, **setting).validate()
    for path in models:
        load_model(path)  # a bad model is a usage problem, found before any job runs
    x, _, pre = evaluation.load()
    pre(x[:1], None, f"{evaluation.data} [{evaluation.input_key}]")  # its warnings and refusals once, here
    if calibration:
        load_calibration(calibration)  # a bad file is found before any job runs
    files = [*models, evaluation.data] + ([calibration] if calibration else [])  # strings: they key the hashes
    fingerprints = {f: fingerprint(f) for f in files}
    common = dict(evaluation=evaluation, out=out, calibration=calibration, bench=bench, threads=threads,
                  fingerprints=fingerprints)
    jobs = []
    for model in models:
        jobs.append(Job(model, None, {}, **{**common, "calibration": None}))
        jobs += [Job(model, m, dict(s), **common) for m in methods for s in settings]
    return jobs


def run_sweep(models: list[str], methods: list[str], settings: list[dict], evaluation: EvalSpec,
              out: str | os.PathLike, *, calibration: str | None = None, bench: BenchSpec | None = None,
              engine: str = "local", workers: int | None = None, threads: int | None = None,
              ray_address: str | None = None, pick_rule: tuple[str, str] | None = None,
              progress: bool = True, options: dict | None = None) -> SweepResult:
    """Run (or take from the cache) every job, then write DIR/sweep.{json,csv,md,png}; with
    ``pick_rule`` (constraints, minimize) also DIR/picked.onnx. ``options``: what the report's
    options record (the CLI's flags; by default these arguments)."""
    from .engines import ENGINES, require_ray, run_jobs
    from .sweep_output import write_outputs

    start = time.perf_counter()
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "ray":
        require_ray()
    if workers is not None and workers < 1 or threads is not None and threads < 1:
        raise UsageError(f"--workers and --threads must be at least 1, got {workers} and {threads}")
    if not methods or not settings:
        raise UsageError("a sweep needs at least one method and one setting")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: its folder {out.parent} does not exist")
    if pick_rule:  # refused before the work, not after it
        parse_constraints(pick_rule[0], tuple(k for setting in settings for k in setting))
        if pick_rule[1] not in MINIMIZE or (pick_rule[1] == "latency" and bench is None):
            raise UsageError(f"--minimize must be one of {', '.join(MINIMIZE)} (latency needs --bench), "
                             f"got {pick_rule[1]!r}")
    threads = threads or 1  # a worker is one core, as a Ray task is one CPU: --workers N uses N cores
    jobs = plan_jobs([str(m) for m in models], methods, settings, evaluation, str(out),
                     calibration=calibration and str(calibration), bench=bench, threads=threads)
    (out / "models").mkdir(parents=True, exist_ok=True)
    rows = {job.key: cached_row(job) for job in jobs}
    todo = [job for job in jobs if rows[job.key] is None]
    show = progress and todo
    if progress and len(todo) < len(jobs):
        tqdm.write(f"{len(jobs) - len(todo)} of {len(jobs)} jobs from the cache in {out / 'jobs'}", file=sys.stderr)
    with tqdm(total=len(todo), desc="sweep", unit="job", disable=None if show else True) as bar:
        for row in run_jobs(todo, run_job, engine=engine, workers=workers, threads=threads, address=ray_address):
            rows[row["key"]] = {**row, "cached": False}
            bar.update(1)
            if show:
                tqdm.write(_progress_line(row), file=sys.stderr)
    rows = _with_baseline([rows[job.key] for job in jobs])
    if options is None:
        options = {"models": [str(m) for m in models], "methods": methods, "settings": settings,
                   "evaluation": asdict(evaluation), "calibration": calibration, "bench": bench and asdict(bench),
                   "engine": engine, "workers": workers, "threads": threads, "ray-address": ray_address,
                   "pick": pick_rule and pick_rule[0], "minimize": pick_rule and pick_rule[1]}
    result = SweepResult(rows=rows, files={}, ran=len(todo), seconds=time.perf_counter() - start, options=options)
    if pick_rule:
        result.pick = pick(rows, *pick_rule)
        if result.pick["row"] is not None:
            result.pick["output"] = str(_write_pick(result.pick["row"], out))
    result.files = write_outputs(result, out)
    return result


def _progress_line(row: dict) -> str:
    head = row["label"] + ": "
    if row["status"] != "ok":
        return head + f"FAILED ({row['error']})"
    return head + f"top-1 {row['accuracy']:.2f} %, {row['params']:,} parameters, {row['seconds']:.1f} s"


def _write_pick(row: dict, out: Path) -> Path:
    loaded = load_model(row["output"])
    dst = out / "picked.onnx"
    save_model(loaded.model, dst, external=loaded.external, source=Path(row["output"]),
               protect=model_files(row["model"]))
    return dst


__all__ = ["BenchSpec", "EvalSpec", "Job", "SweepResult", "pick", "run_sweep"]
