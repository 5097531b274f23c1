"""A small pass manager: each pass is ``run(model, ctx) -> changed``, run in order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import onnx

log = logging.getLogger("onnx_merge")


@dataclass
class Context:
    """What passes share: the user's options and the report they append to."""

    options: Any
    report: dict = field(default_factory=dict)
    progress: Callable | None = None
    plans: list = field(default_factory=list)  # (chain, method, Compensation) from the merge pass
    original: bytes | None = None  # the model before rewriting, for calibration targets
    groups_done: set = field(default_factory=set)  # coupled groups (first producer's name) calibration pruned

    def skip(self, node: str, reason: str) -> None:
        log.info("skipped %s: %s", node, reason)
        self.report.setdefault("skipped", []).append({"node": node, "reason": reason})


class Pass(Protocol):
    name: str

    def run(self, model: onnx.ModelProto, ctx: Context) -> bool: ...


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = passes

    def run(self, model: onnx.ModelProto, ctx: Context) -> bool:
        changed_any = False
        for p in self.passes:
            changed = p.run(model, ctx)
            log.debug("pass %s: %s", p.name, "changed" if changed else "no change")
            ctx.report.setdefault("passes", []).append({"pass": p.name, "changed": bool(changed)})
            changed_any |= changed
        return changed_any
