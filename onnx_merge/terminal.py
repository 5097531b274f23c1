"""What the commands print: text made from reports, nothing computed here.

compress prints, in this order (as onnxsim and onnxslim do): a header (inputs and outputs with
shapes, opset, IR), the summary (parameters, MACs, file size, elapsed time, the verdict and
the data it came from), the per-layer table, the skipped layers grouped by reason, the op-type
counts before and after, and the per-output verification figures.
"""

from __future__ import annotations

import re
from collections import defaultdict

from tabulate import tabulate

WRAP = 40  # characters per table cell before it wraps


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _change(before, after) -> str:
    if not before or after is None:
        return "-"
    return f"{100 * (after - before) / before:+.1f} %"


def _tensor(t: dict) -> str:
    dims = "?" if t["shape"] is None else ", ".join("?" if d is None else str(d) for d in t["shape"])
    return f"{t['name']} [{dims}] {t.get('type') or ''}".rstrip()


def header(model: dict) -> str:
    lines = [f"model {model['path']}: opset {model['opset']}, IR {model['ir_version']}"]
    lines += [f"  input  {_tensor(t)}" for t in model["inputs"]]
    lines += [f"  output {_tensor(t)}" for t in model["outputs"]]
    return "\n".join(lines)


def data_phrase(data: dict) -> str:
    """'16 random samples (input [16, 3, 32, 32])', '125 samples of --calibration (...)'."""
    shapes = ", ".join(f"{k} {v}" for k, v in data.get("shapes", {}).items())
    what = "random samples" if data.get("source") == "random" else f"samples of {data.get('source')}"
    return f"{data.get('samples')} {what}" + (f" ({shapes})" if shapes else "")


def verdict(ver: dict | None) -> str:
    if ver is None:
        return "not verified (--no-verify)"
    gates = ", ".join(f"--{k} {v}" for k, v in ver["gates"].items())
    if not ver["ok"]:
        word = "FAILED" + (f" ({gates})" if gates else "")
    elif ver["warnings"]:
        word = "WARNING (no gate set): " + "; ".join(ver["warnings"])
    else:
        word = "passed" + (f" ({gates})" if gates else " (no gate set)")
    return f"{word}; checked on {data_phrase(ver['data'])}"


def _worst(ver: dict, key: str):
    values = [f[key] for outs in ver["providers"].values() for f in outs.values() if f.get(key) is not None]
    return min(values) if values else None


def summary(report: dict) -> str:
    s = report["summary"]
    rows = [["parameters", f"{s['params_before']:,}", f"{s['params_after']:,}", _change(s["params_before"], s["params_after"])]]
    macs = "MACs (batch 1" + (", " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in s["input_shapes"].items())
                              if s.get("input_shapes") else "") + ")"
    if s["macs_before"] is not None:
        rows.append([macs, f"{s['macs_before']:,}", f"{s['macs_after']:,}" if s["macs_after"] is not None else "-",
                     _change(s["macs_before"], s["macs_after"])])
    rows.append(["file size", human_bytes(s["file_bytes_before"]), human_bytes(s["file_bytes_after"]),
                 _change(s["file_bytes_before"], s["file_bytes_after"])])
    text = tabulate(rows, headers=["", "before", "after", "change"], colalign=("left", "right", "right", "right"))
    ver = report["verification"]
    lines = [text, f"elapsed: {report['elapsed_s']:.1f} s", f"verification: {verdict(ver)}"]
    if s.get("calibration_source") == "synthetic":
        lines.append("refitted on synthetic inputs (dead-leaves images where the model takes images), no data (--calibration FILE.npz does better; "
                     "--calibration none: the data-free plan)")
    block = (s.get("alignment") or {}).get("conv_block", 1)
    if block > 1:
        lines.append(f"conv channel counts: multiples of up to {block} for {', '.join(s['alignment']['providers'])} "
                     "kernels where cheap (--round-to 1: exact)")
    if s.get("held_back"):
        lines.append(f"pruned less than asked (predicted error over --max-group-error): {len(s['held_back'])} "
                     "group(s), see the layer table ('asked') and the skipped list")
    if ver is not None and ver["providers"]:
        cos, agree = _worst(ver, "cosine"), _worst(ver, "top1_agreement")
        figures = [f"lowest cosine {cos:.6f}" if cos is not None else None,
                   f"lowest top-1 agreement {agree:.4f}" if agree is not None else None]
        if any(figures):
            lines.append("  " + ", ".join(f for f in figures if f))
    return "\n".join(lines)


def layer_table(layers: list[dict]) -> str:
    if not layers:
        return "no layer was compressed"
    rows = [[r["layer"], r["op"], r["consumer"], f"{r['channels']} -> {r['kept']}" + (f" (asked {r['asked_kept']})" if "asked_kept" in r else ""), r.get("merged", 0),
             r.get("regressed", 0), r.get("pruned", 0), r["method"], r.get("calibration") or "-"] for r in layers]
    return tabulate(rows, headers=["layer", "op", "consumer", "channels", "merged", "regressed", "pruned", "method",
                                   "calibrated"], maxcolwidths=[WRAP, None, WRAP, None, None, None, None, 20, WRAP])


def allocation_table(allocation: dict | None) -> str:
    """Where a --target-macs / --target-params budget went: each layer's ratio and predicted error."""
    if not allocation:
        return ""
    rows = [[g["layer"], f"{g['channels']} -> {g['kept']}", f"{g['ratio']:.3f}", f"{g['predicted_error']:.4f}",
             "-" if g["stream_share"] is None else f"{g['stream_share']:.3f}", "pinned" if g["pinned"] else ""]
            for g in allocation["groups"]]
    return (tabulate(rows, headers=["layer", "channels", "ratio", "predicted error", "stream share", ""]) +
            f"\nallocation: {100 * allocation['predicted_fraction']:.2f} % of the {allocation['target']} kept "
            f"(target {100 * allocation['fraction']:.2f} %)")


def ratio_text(row: dict, digits: int = 2, unit: str = "x", label: str = "95 % ") -> str:
    """The p50 ratio with its interval where there is one: "0.81x (95 % 0.79-0.83)"."""
    text = f"{row['p50_ratio']:.{digits}f}{unit}"
    interval = row.get("p50_ratio_interval")
    return text if not interval else f"{text} ({label}{interval[0]:.{digits}f}-{interval[1]:.{digits}f})"


def latency_table(latency: dict | None) -> str:
    """compress --bench: the result's latency against the original's, beside its MACs."""
    if not latency:
        return ""
    rows = [[r["batch"], r["threads"] or "default", f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", ratio_text(r, 3, "", ""),
             "-" if r["macs_ratio"] is None else f"{r['macs_ratio']:.3f}"] for r in latency["rows"][1::2]]
    return tabulate(rows, headers=["batch", "threads", "p50 ms", "p90 ms", "p50 vs original (95 %)", "MACs vs original"])


def _reason_kind(reason: str) -> str:
    """A reason with the names in it blanked, so that alike reasons group together."""
    return re.sub(r"'[^']*'", "'…'", reason)


def skipped(skips: list[dict], verbose: bool = False) -> str:
    if not skips:
        return ""
    if verbose:
        return "\n".join(f"skipped {s['node']}: {s['reason']}" for s in skips)
    groups: dict[str, list[str]] = defaultdict(list)
    for s in skips:
        groups[_reason_kind(s["reason"])].append(s["node"])
    rows = []
    for kind, nodes in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(nodes[:3]) + (f", ... ({len(nodes) - 3} more)" if len(nodes) > 3 else "")
        rows.append([len(nodes), kind, shown])
    return (f"skipped {len(skips)} layers (-v lists each):\n"
            + tabulate(rows, headers=["count", "reason", "layers"], maxcolwidths=[None, 60, WRAP]))


def op_types(before: dict, after: dict) -> str:
    ops = sorted(set(before) | set(after))
    rows = [[op, before.get(op, 0), after.get(op, 0)] for op in ops]
    rows.append(["total", sum(before.values()), sum(after.values())])
    return tabulate(rows, headers=["op type", "before", "after"])


def verification_table(ver: dict) -> str:
    def num(f, key, spec):
        return format(f[key], spec) if f.get(key) is not None else "-"

    rows = [[prov, name, num(f, "max_abs", ".3g"), num(f, "max_rel", ".3g"), num(f, "cosine", ".6f"),
             num(f, "top1_agreement", ".4f"), f.get("nonfinite", "-")]
            for prov, outs in ver["providers"].items() for name, f in outs.items()]
    text = tabulate(rows, headers=["provider", "output", "max abs", "max rel", "cosine", "top-1 agree", "NaN/Inf"])
    return "\n".join([text] + [f"FAIL {f}" for f in ver["failures"]])


def head_table(heads: list[dict]) -> str:
    rows = [[h["layer"], f"{h['heads']} -> {h['kept']}", h["head_dim"], ", ".join(map(str, h["removed"]))]
            for h in heads]
    return tabulate(rows, headers=["attention", "heads", "head dim", "removed"]) if rows else ""


def compress_text(report: dict, verbose: bool = False) -> str:
    before, after = report["models"]
    parts = [header(before), summary(report), layer_table(report["details"]["layers"]),
             allocation_table(report["details"].get("allocation")),
             head_table(report["details"].get("heads", [])),
             skipped(report["details"]["skipped"], verbose), op_types(before["op_types"], after["op_types"])]
    if report["verification"] is not None and report["verification"]["providers"]:
        parts.append(verification_table(report["verification"]))
    parts.append(latency_table(report["details"].get("latency")))
    return "\n\n".join(p for p in parts if p)
