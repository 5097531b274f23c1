"""Options of ``compress``, shared by the API, the CLI and the passes."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from .errors import UsageError
from .math import BN_RULES, CRITERIA, SCALE_RULES, PlanOptions, keep_count
from .math.criteria import ALIGN_SLACK, channel_floor, channel_step

METHODS = ("merge", "prune", "regress")
AUTO = "auto"
SENSITIVITIES = (AUTO, "output", "consumer", "combined")
SYNTHETIC = "synthetic"  # --calibration synthetic: made-up images (math.synthetic), no data
DATA_FREE = "none"  # --calibration none: the data-free plan, also where a budget would refit on synthetic images
SYNTHETIC_SAMPLES = 256
MAX_MERGE_COST_CHANNELS = 2048  # like regress: wider layers keep the O(N) ranking, time and memory


@dataclass
class CompressOptions:
    ratio: float = 0.5
    method: str = "regress"
    criterion: str = AUTO  # per layer: see plan_options
    threshold: float = 0.1
    lam: float = 0.85
    scale_rule: str = AUTO
    bn_rule: str = "fold"
    layer_ratios: list[tuple[str, float]] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    # kept channel counts: multiples of round_to; None (auto): rounded up toward the channel block
    # of the kernels the result runs on (``providers``), where that costs few channels
    round_to: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    block_floor: bool = True  # in auto, a conv a block wide keeps a block (off where a budget needs less)
    fold_bn: bool = True
    coupled: str = "skip"  # "prune": also prune coupled channel groups (residual adds, depthwise convs)
    bias_from_bn: bool = False
    independent_layers: bool = False  # plan every layer from the original weights (the paper's procedure)
    # graph input name -> array, preprocessed as the model expects; SYNTHETIC: made-up inputs
    # (api.synthetic_calibration), made once the model's input shapes are known; DATA_FREE; None:
    # synthetic for a budget on a model that takes images, else data-free (api.resolve_calibration)
    calibration: dict | str | None = None
    calibration_batch: int = 64
    calibration_ridge: float = 1e-3  # relative to the mean diagonal of the Gram matrix
    calibration_mixup: int = 3  # mixed samples per calibration sample (onnx_merge/calibration.py); 0: none
    calibration_rows: int = 4096  # patch rows per batch entering the least-squares statistics (more for wide consumers)
    refine_iterations: int = 100  # L-BFGS iterations of block refinement (fully connected chains); 0: off
    # A global budget instead of one ratio: keep this fraction of the MACs or parameters, the
    # layers' ratios allocated where they cost least (onnx_merge/allocation.py fills ``allocated``,
    # layer name -> ratio; --layer-ratio and --exclude still pin the layers they match).
    target_macs: float | None = None
    target_params: float | None = None
    allocated: dict[str, float] = field(default_factory=dict)
    # how the budget rates a layer (allocation.chain_curves): "output", the change in the model's
    # outputs measured on calibration samples or noise; "consumer", the plan's predicted error in
    # the consumer's output (no run of the model; comparable across layers only without residuals);
    # "combined", their geometric mean; "auto", output, or combined data-free on BN-kept models
    sensitivity: str = "auto"
    # A coupled group (depthwise, gated) pruned without a model of what its removed channels carried
    # is pruned only as far as its predicted relative output error stays under this (METHOD.md,
    # passes/prune_coupled.py); 1 applies every asked ratio as it is.
    max_group_error: float = 0.1
    heads: float = 0.0  # fraction of attention heads removed per attention layer (passes/prune_heads.py)
    skip_fold: bool = False  # leave constant subgraphs as they are (passes/fold_constants.py)
    fold_max_elements: int = 2**28  # a folded constant may hold this many elements ...
    fold_max_mb: float = 1024.0  # ... and this many MiB; a bigger one is refused, naming its node

    def validate(self) -> "CompressOptions":
        ratios = [self.ratio, self.heads] + [r for _, r in self.layer_ratios]
        if any(not 0.0 <= r < 1.0 for r in ratios):
            raise UsageError(f"ratios must lie in [0, 1): got {', '.join(map(str, ratios))}")
        for value, allowed, what in ((self.method, METHODS, "method"), (self.criterion, CRITERIA + (AUTO,), "criterion"),
                                     (self.scale_rule, SCALE_RULES + (AUTO,), "scale rule"), (self.bn_rule, BN_RULES, "BN rule")):
            if value not in allowed:
                raise UsageError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        if not 0.0 <= self.lam <= 1.0:
            raise UsageError(f"lambda must lie in [0, 1], got {self.lam}")
        if self.sensitivity not in SENSITIVITIES:
            raise UsageError(f"--sensitivity is one of {', '.join(SENSITIVITIES)}: got {self.sensitivity!r}")
        if self.target_macs is not None and self.target_params is not None:
            raise UsageError("--target-macs and --target-params exclude each other: give one")
        if self.target is not None and not 0.0 < self.target[1] <= 1.0:
            raise UsageError(f"--target-{self.target[0]} is the fraction to keep, in (0, 1]: got {self.target[1]}")
        if not 0.0 < self.max_group_error <= 1.0:
            raise UsageError(f"--max-group-error must lie in (0, 1], got {self.max_group_error}")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError(f"--round-to must be at least 1, got {self.round_to}")
        if self.coupled not in ("skip", "prune"):
            raise UsageError(f"--coupled must be skip or prune, got {self.coupled!r}")
        if isinstance(self.calibration, str) and self.calibration not in (SYNTHETIC, DATA_FREE):
            raise UsageError(f"calibration must be arrays, {SYNTHETIC!r} or {DATA_FREE!r}, got {self.calibration!r}")
        if self.calibration_batch < 1:
            raise UsageError("the calibration batch must be at least 1")
        if self.calibration_mixup < 0:
            raise UsageError(f"--calibration-mixup must be 0 (off) or more, got {self.calibration_mixup}")
        if self.refine_iterations < 0:
            raise UsageError(f"--refine-iterations must be 0 (off) or more, got {self.refine_iterations}")
        if not self.fold_max_elements >= 1 or not self.fold_max_mb > 0:
            raise UsageError(f"--fold-max-elements and --fold-max-mb must be positive, got "
                             f"{self.fold_max_elements} and {self.fold_max_mb}")
        return self

    def plan_options(self, method: str, bn_hidden: bool = False, dense: bool = False, channels: int = 0) -> PlanOptions:
        """The plan's options for one layer, ``auto`` resolved.

        ``bn_hidden``: a Conv reaching its activation with no BatchNormalization in between. In a
        trained conv net that almost always means BN was folded into the conv at export, so each
        row carries gamma / sigma and its norm says little; there ``auto`` ranks by the
        rescaling-invariant l2-path and merges with the norm-ratio scale. ``dense``: a Gemm or
        MatMul layer; one that merges keeps the set of channels that merge best (merge-cost, up to
        MAX_MERGE_COST_CHANNELS: it holds an N x N similarity matrix). Conv filters are rarely
        near-copies of one another, and there merge-cost measured worse than the norms. Everything
        else ranks by l1-norm; the scale is the projection (BENCHMARKS.md measures these choices).
        """
        if self.criterion != AUTO:
            criterion = self.criterion
        elif bn_hidden:
            criterion = "l2-path"
        elif dense and method != "prune" and channels <= MAX_MERGE_COST_CHANNELS:
            criterion = "merge-cost"
        else:
            criterion = "l1-norm"
        scale_rule = self.scale_rule if self.scale_rule != AUTO else "exact" if bn_hidden else "projection"
        return PlanOptions(method=method, criterion=criterion, threshold=self.threshold, lam=self.lam,
                           scale_rule=scale_rule, bn_rule=self.bn_rule, bias_from_bn=self.bias_from_bn)

    def alignment(self, n: int, op_type: str, multiple: int = 1) -> tuple[int, int]:
        """(step, floor): kept counts of a layer (or group) of ``n`` channels are multiples of
        ``step`` and at least ``floor``. ``round_to`` K: (K, 1). In auto, toward the channel block
        of the kernels the result runs on for ``op_type`` (criteria.channel_step, channel_floor).
        Always a multiple of ``multiple`` (conv groups)."""
        if self.round_to is not None:
            return math.lcm(self.round_to, multiple), 1
        block = self.channel_block(op_type)
        step = channel_step(n, block, whole_blocks=self.block_floor)
        aligned = math.lcm(step, multiple)  # a grouped conv: whole groups too, if that is not too coarse
        step = aligned if aligned <= n and (aligned == step or aligned - 1 <= ALIGN_SLACK * n) else multiple
        floor = channel_floor(n, block) if self.block_floor else 1
        return step, floor if floor % step == 0 else 1

    def channel_block(self, op_type: str) -> int:
        """The channel block of the kernels ``providers`` run ``op_type`` with (runtime.channel_block)."""
        from .runtime import channel_block

        return max(channel_block(p, op_type) for p in self.providers)

    def kept_channels(self, n: int, ratio: float, op_type: str, multiple: int = 1) -> int:
        """Channels a layer (or group) of ``n`` keeps at ``ratio``, aligned (``alignment``)."""
        step, floor = self.alignment(n, op_type, multiple)
        return max(keep_count(n, ratio, step), floor)

    def kept_whole_by_alignment(self, n: int, ratio: float, op_type: str, multiple: int = 1) -> str | None:
        """Why ``kept_channels`` keeps all ``n`` although ``ratio`` asks to remove some (the step
        or floor of ``alignment``); None where the ratio itself keeps them all."""
        asked = keep_count(n, ratio)
        if asked >= n:
            return None
        step, floor = self.alignment(n, op_type, multiple)
        why = f"at least {floor}" if floor >= n else f"a multiple of {step}"
        return f"{asked} of {n} channels rounded up to {why} is all of them (--round-to 1 keeps exact counts)"

    @property
    def target(self) -> tuple[str, float] | None:
        """("macs" | "params", fraction to keep), or None without a global budget."""
        if self.target_macs is not None:
            return "macs", self.target_macs
        return None if self.target_params is None else ("params", self.target_params)

    def pinned(self, names: list[str]) -> bool:
        """Whether --layer-ratio or --exclude fixes this layer (a budget leaves it as it is)."""
        return any(fnmatch.fnmatchcase(n, g) for g in self.exclude + [g for g, _ in self.layer_ratios] for n in names)

    def ratio_for(self, names: list[str]) -> float | None:
        """The ratio for a layer known by ``names``; None when it is excluded. Last match wins;
        a --layer-ratio match wins over the allocation, which wins over ``ratio``."""
        if any(fnmatch.fnmatchcase(n, g) for g in self.exclude for n in names):
            return None
        ratio = next((self.allocated[n] for n in names if n in self.allocated), self.ratio)
        for glob, r in self.layer_ratios:
            if any(fnmatch.fnmatchcase(n, glob) for n in names):
                ratio = r
        return ratio
