"""Run an original and a candidate model on the same inputs and compare their outputs.

A candidate passes when it has the original's outputs with their shapes, holds no NaN or Inf
where the original holds finite values (in every mode: no tolerance lets that through), and
meets the gates that were set. ``atol``/``rtol`` compare values one by one; ``min_cosine`` and
``max_top1_disagreement`` judge models meant to move. Without any gate the figures are only
reported, with a warning when the top-1 agreement or the cosine falls below WARN_BELOW.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from .checkdata import CheckData
from .errors import ModelError, UsageError
from .runtime import make_session, match_inputs, run_batched

WARN_BELOW = 0.9  # top-1 agreement or cosine under this ends compress with a WARNING (no gate set)
DEFAULT_ATOL, DEFAULT_RTOL = 1e-4, 1e-3


def compare_arrays(ref: np.ndarray, cand: np.ndarray) -> dict:
    """Error figures of one output: max abs/rel error, cosine similarity, top-1 agreement, and how
    many values are NaN or Inf in the candidate where the original's are finite. Figures are
    taken over the positions finite in both."""
    if ref.shape != cand.shape:
        return {"shape": list(ref.shape), "candidate_shape": list(cand.shape)}
    a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    nonfinite = int(np.count_nonzero(np.isfinite(a) & ~np.isfinite(b)))
    a, b = a[finite], b[finite]
    diff = np.abs(a - b)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    out = {"shape": list(ref.shape), "max_abs": float(diff.max()) if diff.size else 0.0,
           "max_rel": float(diff.max() / scale) if diff.size and scale > 0 else 0.0,
           "cosine": float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b)),
           "nonfinite": nonfinite}
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        out["top1_agreement"] = float(np.mean(ref.argmax(-1) == cand.argmax(-1)))
    return out


def _check_number(flag: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or math.isnan(value) or not low <= value <= high:
        raise UsageError(f"{flag} must be a number in [{low:g}, {high:g}], got {value}")


@dataclass
class Tolerance:
    """The gates a candidate must pass; None where not set.

    atol/rtol apply when either is set, or when no other gate is (plain ``verify``: the
    candidate should reproduce the original); the one not given then takes its default.
    """

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    max_top1_disagreement: float | None = None

    def validate(self) -> "Tolerance":
        _check_number("--atol", self.atol, 0.0, math.inf)
        _check_number("--rtol", self.rtol, 0.0, math.inf)
        if self.atol is not None and math.isinf(self.atol) or self.rtol is not None and math.isinf(self.rtol):
            raise UsageError("--atol and --rtol must be finite")
        _check_number("--min-cosine", self.min_cosine, -1.0, 1.0)
        _check_number("--max-top1-disagreement", self.max_top1_disagreement, 0.0, 1.0)
        return self

    @property
    def elementwise(self) -> tuple[float, float] | None:
        """(atol, rtol) to apply value by value, or None."""
        moving = self.min_cosine is not None or self.max_top1_disagreement is not None
        if self.atol is None and self.rtol is None and moving:
            return None
        return (DEFAULT_ATOL if self.atol is None else self.atol, DEFAULT_RTOL if self.rtol is None else self.rtol)

    def gates(self) -> dict:
        """The gates applied, named as on the command line."""
        gates = {}
        if self.elementwise:
            gates["atol"], gates["rtol"] = self.elementwise
        for key, value in (("min-cosine", self.min_cosine), ("max-top1-disagreement", self.max_top1_disagreement)):
            if value is not None:
                gates[key] = value
        return gates


def check_output(name: str, ref: np.ndarray, cand: np.ndarray, figures: dict, tol: Tolerance | None) -> list[str]:
    """The reasons this output fails, each naming the figure (none: it passes)."""
    if "max_abs" not in figures:
        return [f"output {name!r}: shape {tuple(cand.shape)} differs from the original's {tuple(ref.shape)}"]
    reasons = []
    if figures["nonfinite"]:
        reasons.append(f"output {name!r}: {figures['nonfinite']} of {cand.size} values are NaN or Inf where the "
                       "original's are finite")
    if tol is None:
        return reasons
    # written as "not (x >= gate)" so that a NaN figure fails
    if tol.min_cosine is not None and not figures["cosine"] >= tol.min_cosine:
        reasons.append(f"output {name!r}: cosine similarity {figures['cosine']:.6f} < --min-cosine {tol.min_cosine}")
    agree = figures.get("top1_agreement")
    if tol.max_top1_disagreement is not None and agree is not None and not 1 - agree <= tol.max_top1_disagreement:
        reasons.append(f"output {name!r}: top-1 disagreement {1 - agree:.4f} > --max-top1-disagreement "
                       f"{tol.max_top1_disagreement}")
    if tol.elementwise:
        atol, rtol = tol.elementwise
        close = np.isclose(cand.astype(np.float64), ref.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True)
        if not close.all():
            reasons.append(f"output {name!r}: {int(close.size - close.sum())} of {close.size} values outside "
                           f"--atol {atol} / --rtol {rtol} (max abs error {figures['max_abs']:.3g}, "
                           f"max rel {figures['max_rel']:.3g})")
    return reasons


@dataclass
class Verification:
    ok: bool
    data: dict = field(default_factory=dict)  # which data checked the model: source, samples, shapes
    gates: dict = field(default_factory=dict)  # the gates that were set (empty: figures only)
    providers: dict = field(default_factory=dict)  # provider -> output -> figures
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "data": self.data, "gates": self.gates, "providers": self.providers,
                "failures": self.failures, "warnings": self.warnings}

    def worst(self, key: str) -> float | None:
        values = [f[key] for outs in self.providers.values() for f in outs.values() if f.get(key) is not None]
        return min(values) if values else None


def _session_source(model) -> str | os.PathLike | bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return model


def _run(session, feeds, what: str) -> dict:
    try:
        return run_batched(session, feeds)
    except Exception as exc:  # onnxruntime's own error types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        raise ModelError(f"{what}: onnxruntime cannot run it on {shapes} ({first}); for dynamic dims "
                         "pass --input-shape NAME=1x3x224x224") from None


def _input_blind(name: str, ref: np.ndarray) -> str | None:
    """A warning when the original's output does not depend on the samples (a zero-initialised
    head, a dead network): then any candidate that outputs the same constant agrees perfectly."""
    if ref.size > 1 and np.all(ref == ref.flat[0]):
        what = f"is {ref.flat[0]:g} everywhere"
    elif ref.ndim > 0 and ref.shape[0] > 1 and np.all(ref == ref[:1]):
        what = f"is the same for all {ref.shape[0]} samples"
    else:
        return None
    return f"the original's output {name!r} {what}: agreeing with it says nothing (check on real data or weights)"


def verify_models(original, candidate, *, inputs: dict | None = None, providers: list[str] = ("cpu",),
                  tolerance: Tolerance | None = Tolerance(), check: CheckData | None = None,
                  input_source: str = "--inputs") -> Verification:
    """Compare ``candidate`` against ``original`` on each provider (graph optimizations off).

    Models: paths, serialized bytes or ModelProtos. Data: ``inputs`` (arrays by input name,
    described as ``input_source``), else ``check`` (random samples, CheckData()). ``tolerance``
    None reports the figures without judging them: only missing outputs, changed shapes and
    NaN/Inf fail then, and figures below WARN_BELOW are listed as warnings.
    """
    if tolerance is not None:
        tolerance.validate()
    original, candidate = _session_source(original), _session_source(candidate)
    result = Verification(ok=True, gates=tolerance.gates() if tolerance is not None else {})
    for provider in providers:
        ref_session = make_session(original, provider)
        cand_session = make_session(candidate, provider)
        if inputs is None:
            feeds, result.data = (check or CheckData()).feeds(original, ref_session.get_inputs())
        else:
            feeds = match_inputs(ref_session.get_inputs(), inputs, input_source)
            result.data = {"source": input_source, "samples": len(next(iter(feeds.values()))),
                           "shapes": {k: list(v.shape) for k, v in feeds.items()}}
        ref = _run(ref_session, feeds, "the original model")
        cand_names = {o.name for o in cand_session.get_outputs()}
        missing = [n for n in ref if n not in cand_names]
        if missing:
            result.failures.append(f"[{provider}] candidate lacks outputs {', '.join(missing)}")
            result.ok = False
            continue
        cand = _run(cand_session, feeds, "the candidate model")
        result.providers[provider] = {}
        for name, ref_out in ref.items():
            figures = compare_arrays(ref_out, cand[name])
            result.providers[provider][name] = figures
            reasons = check_output(name, ref_out, cand[name], figures, tolerance)
            same = _input_blind(name, ref_out)
            if same and same not in result.warnings:
                result.warnings.append(same)
            result.failures += [f"[{provider}] {r}" for r in reasons]
            result.ok = result.ok and not reasons
    if not result.gates:
        for key, label in (("top1_agreement", "top-1 agreement"), ("cosine", "cosine similarity")):
            worst = result.worst(key)
            if worst is not None and worst < WARN_BELOW:
                result.warnings.append(f"{label} {worst:.4f} is below {WARN_BELOW}")
    return result
