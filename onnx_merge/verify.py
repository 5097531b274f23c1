"""Run an original and a candidate model on the same inputs and compare their outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .runtime import make_session, match_inputs, random_inputs, run_batched


def compare_arrays(ref: np.ndarray, cand: np.ndarray) -> dict:
    """Error figures of one output: max abs/rel error, cosine similarity, top-1 agreement."""
    if ref.shape != cand.shape:
        return {"shape": list(ref.shape), "candidate_shape": list(cand.shape)}
    a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    diff = np.abs(a - b)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    out = {"shape": list(ref.shape), "max_abs": float(diff.max()) if diff.size else 0.0,
           "max_rel": float(diff.max() / scale) if diff.size and scale > 0 else 0.0,
           "cosine": float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))}
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        out["top1_agreement"] = float(np.mean(ref.argmax(-1) == cand.argmax(-1)))
    return out


@dataclass
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float | None = None
    max_top1_disagreement: float | None = None
    # With a cosine or top-1 gate, models are meant to move: atol/rtol are then not applied.

    @property
    def moving(self) -> bool:
        return self.min_cosine is not None or self.max_top1_disagreement is not None


def check_output(name: str, ref: np.ndarray, cand: np.ndarray, figures: dict, tol: Tolerance | None) -> str | None:
    """The reason this output fails the tolerance, or None."""
    if "max_abs" not in figures:
        return f"output {name!r}: shape {tuple(cand.shape)} differs from the original's {tuple(ref.shape)}"
    if tol is None:
        return None
    if tol.moving:
        if tol.min_cosine is not None and figures["cosine"] < tol.min_cosine:
            return f"output {name!r}: cosine similarity {figures['cosine']:.6f} < {tol.min_cosine}"
        agree = figures.get("top1_agreement")
        if tol.max_top1_disagreement is not None and agree is not None and 1 - agree > tol.max_top1_disagreement:
            return f"output {name!r}: top-1 disagreement {1 - agree:.4f} > {tol.max_top1_disagreement}"
        return None
    bad = np.abs(cand.astype(np.float64) - ref) > tol.atol + tol.rtol * np.abs(ref.astype(np.float64))
    if bad.any():
        return (f"output {name!r}: {int(bad.sum())} of {bad.size} values outside atol {tol.atol} / rtol {tol.rtol} "
                f"(max abs error {figures['max_abs']:.3g}, max rel {figures['max_rel']:.3g})")
    return None


@dataclass
class Verification:
    ok: bool
    providers: dict = field(default_factory=dict)  # provider -> output -> figures
    failures: list[str] = field(default_factory=list)
    inputs: str = "random"

    def as_dict(self) -> dict:
        return {"ok": self.ok, "inputs": self.inputs, "providers": self.providers, "failures": self.failures}


def verify_models(original: str | os.PathLike, candidate: str | os.PathLike, *, inputs: dict | None = None,
                  providers: list[str] = ("cpu",), tolerance: Tolerance | None = Tolerance(), batch: int = 2,
                  seed: int = 0, input_source: str = "--inputs") -> Verification:
    """Compare ``candidate`` against ``original`` on each provider (graph optimizations off).

    ``tolerance=None`` reports the figures without judging them (a compressed model is
    meant to move; only missing outputs or changed shapes fail then).
    """
    result = Verification(ok=True, inputs="random" if inputs is None else input_source)
    for provider in providers:
        ref_session = make_session(original, provider)
        cand_session = make_session(candidate, provider)
        feeds = random_inputs(ref_session, batch, seed) if inputs is None else match_inputs(ref_session.get_inputs(), inputs, input_source)
        ref = run_batched(ref_session, feeds)
        cand_names = {o.name for o in cand_session.get_outputs()}
        missing = [n for n in ref if n not in cand_names]
        if missing:
            result.failures.append(f"[{provider}] candidate lacks outputs {', '.join(missing)}")
            result.ok = False
            continue
        cand = run_batched(cand_session, feeds)
        result.providers[provider] = {}
        for name, ref_out in ref.items():
            figures = compare_arrays(ref_out, cand[name])
            result.providers[provider][name] = figures
            reason = check_output(name, ref_out, cand[name], figures, tolerance)
            if reason:
                result.failures.append(f"[{provider}] {reason}")
                result.ok = False
    return result
