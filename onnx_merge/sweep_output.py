"""A sweep's results as files: JSON (every figure), CSV, a Markdown table and a PNG of accuracy
against MACs (and latency) with the Pareto frontier marked."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
from tabulate import tabulate

from . import report
from .files import write_bytes_atomic, write_text_atomic
from .math.pareto import pareto_front

log = logging.getLogger("onnx_merge")

FIRST = ["label", "model", "method"]
LAST = ["status", "accuracy", "accuracy_drop", "top5", "samples", "params", "params_kept", "macs", "macs_kept",
        "params_before", "macs_before", "cosine", "top1_agreement", "latency_ms", "latency_ratio", "seconds",
        "cached", "output", "key", "error"]


def columns(rows: list[dict]) -> list[str]:
    """The CSV's columns: identity, the swept settings (whatever they are), then the figures."""
    settings = [k for r in rows for k in r if k not in FIRST and k not in LAST]
    return FIRST + list(dict.fromkeys(settings)) + LAST


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def summary_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    settings = columns(rows)[len(FIRST):-len(LAST)]
    bench = any(r.get("latency_ms") is not None for r in rows)
    headers = ["model", "method", *settings, "top-1 %", "drop", "params kept %", "MACs (M)", "MACs kept %", "cosine"]
    headers += ["latency ms", "latency ratio"] if bench else []
    headers += ["s", "note"]
    table = []
    for r in rows:
        line = [Path(r["model"]).stem, r["method"], *[r.get(k, "-") for k in settings]]
        if r["status"] != "ok":
            line += ["-"] * (len(headers) - len(line) - 2) + [_fmt(r.get("seconds"), ".1f"), f"FAILED: {r['error']}"]
            table.append(line)
            continue
        macs = r.get("macs")
        line += [_fmt(r["accuracy"], ".2f"), _fmt(r.get("accuracy_drop"), "+.2f"),
                 _fmt(r.get("params_kept") and 100 * r["params_kept"], ".1f"),
                 _fmt(macs and macs / 1e6, ".2f"), _fmt(r.get("macs_kept") and 100 * r["macs_kept"], ".1f"),
                 _fmt(r.get("cosine"), ".4f")]
        if bench:
            line += [_fmt(r.get("latency_ms"), ".3f"), _fmt(r.get("latency_ratio"), ".3f")]
        line += [_fmt(r.get("seconds"), ".1f"), "cached" if r.get("cached") else ""]
        table.append(line)
    return headers, table


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def frontier(rows: list[dict], cost: str) -> list[dict]:
    """The rows no other row beats on both ``cost`` (lower) and accuracy (higher), by cost."""
    done = [r for r in rows if r["status"] == "ok" and r.get(cost) is not None]
    mask = pareto_front([r[cost] for r in done], [r["accuracy"] for r in done])
    return sorted((r for r, on in zip(done, mask) if on), key=lambda r: r[cost])


def plot(rows: list[dict]) -> bytes | None:
    """Accuracy against MACs (and p50 latency, where timed), each model and method a series, the
    Pareto frontier over all of them dashed and circled. None when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("no sweep.png: matplotlib is missing (pip install 'onnx-merge[bench]')")
        return None
    axes_on = [("macs", "MACs (millions, batch 1)", 1e-6)]
    if any(r.get("latency_ms") is not None for r in rows):
        axes_on.append(("latency_ms", "p50 latency (ms)", 1.0))
    fig = Figure(figsize=(6.5 * len(axes_on), 4.8))
    models = list(dict.fromkeys(Path(r["model"]).stem for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = "osD^v<>p*h"
    for i, (cost, title, unit) in enumerate(axes_on):
        ax = fig.add_subplot(1, len(axes_on), i + 1)
        for model in models:
            for j, method in enumerate(methods):
                series = sorted((r for r in rows if r["status"] == "ok" and Path(r["model"]).stem == model
                                 and r["method"] == method and r.get(cost) is not None), key=lambda r: r[cost])
                if not series:
                    continue
                x = np.array([r[cost] for r in series]) * unit
                y = [r["accuracy"] for r in series]
                name = f"{model} {method}" if len(models) > 1 else method
                ax.plot(x, y, marker="*" if method == "original" else markers[models.index(model) % len(markers)],
                        markersize=12 if method == "original" else 6, linestyle="-" if len(series) > 1 else "none",
                        color="black" if method == "original" else f"C{j}", label=name, alpha=0.8)
        front = frontier(rows, cost)
        if front:
            fx = np.array([r[cost] for r in front]) * unit
            ax.step(fx, [r["accuracy"] for r in front], where="post", color="grey", linestyle="--", linewidth=1,
                    label="Pareto frontier")
            ax.scatter(fx, [r["accuracy"] for r in front], s=150, facecolors="none", edgecolors="grey")
        ax.set_xlabel(title)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("onnx-merge sweep: accuracy against cost")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_outputs(result, out: Path) -> dict:
    rows = result.rows
    files = {"json": out / "sweep.json", "csv": out / "sweep.csv", "markdown": out / "sweep.md"}
    front = {cost: [r["label"] for r in frontier(rows, cost)] for cost in ("macs", "latency_ms")}
    originals = [r for r in rows if r["method"] == "original"]
    models = [{"role": "input", "path": r["model"], "params": r.get("params"), "macs": r.get("macs")}
              for r in originals]
    summary = {"jobs": len(rows), "jobs_run": result.ran, "failed": sum(r["status"] != "ok" for r in rows),
               "frontier": front, "pick": result.pick}
    data = report.new_report("sweep", options=result.options, models=models, summary=summary,
                             details={"rows": rows}, elapsed_s=result.seconds)
    headers, table = summary_table(rows)
    markdown = tabulate(table, headers=headers, tablefmt="github")
    if result.pick:
        markdown += f"\n\nPicked: {result.pick['why']}\n"
    png = plot(rows)
    inputs = {r["model"] for r in rows}  # an input named like an output is never overwritten
    write_text_atomic(files["csv"], _csv(rows), inputs)
    write_text_atomic(files["markdown"], markdown + "\n", inputs)
    if png is not None:
        files["png"] = out / "sweep.png"
        write_bytes_atomic(files["png"], png, inputs)
    summary["files"] = {k: str(v) for k, v in files.items()}
    write_text_atomic(files["json"], report.to_json(data), inputs)
    return files
