"""A global budget on a model: each chain's cost curve, and the per-layer ratios that meet
``--target-macs`` / ``--target-params`` where removing channels costs least.

From the analysis this reads, per chain, only its names, channel count, what one removed
channel saves and the producer's arrays the planner gets; the curves and the allocation are
NumPy (math/sensitivity.py, math/budget.py). The result is a map layer name -> ratio that
``CompressOptions.ratio_for`` consults, so the passes run as with hand-written ratios.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .calibration import CalibrationSet, truncated
from .errors import UsageError
from .graph import GraphIndex
from .groups import Chain, Group, find_chains
from .math import PlanOptions, keep_count, plan_layer
from .math.budget import BudgetGroup, BudgetTerm, BudgetUnreachable, allocate, per_channel, spend
from .math.regress import consumer_metric_root, regress_plan
from .math.sensitivity import (measured_curve, measured_moments, output_change, planned_curve,
                               probe_counts, reconstruction)
from .math.synthetic import synthetic_inputs
from .ops import REDUCE, RESHAPE, conv_groups, rule
from .options import CompressOptions
from .runtime import FLOAT_TYPES, graph_inputs, make_session, match_inputs
from .stats import count_macs, count_parameters, node_macs

if TYPE_CHECKING:
    from .passes.prune_coupled import GroupRanking

log = logging.getLogger("onnx_merge")

PROBE_SAMPLES = 64  # inputs each point of a measured curve is run on
PROBE_POINTS = 8  # counts per chain at which the model's output change is measured
PROBE_MIN_SAMPLES = 8  # fewer than this within PROBE_MACS: the predicted curves instead
PROBE_MACS = 2e12  # multiply-accumulates all runs of the output curves may take (ResNet-56 at 64 samples: 1.7e12)


@dataclass
class ChainCurve:
    """One chain as the budget sees it: ``cost[k]`` after removing k channels."""

    layer: str
    names: list[str]
    channels: int
    cost: np.ndarray
    share: float | None = None  # of the residual stream its consumer feeds, measured on calibration data
    measured_on: str | None = None  # output curves: "calibration" or "synthetic"; None: predicted at the consumer
    op: str = "Conv"  # the producer's op type and its conv groups: what kept counts align to
    multiple: int = 1
    group: "GroupUnit | None" = None  # a coupled group's curve, not a chain's

    @property
    def kind(self) -> str:
        return "chain" if self.group is None else f"{self.group.group.kind} group"


@dataclass
class GroupUnit:
    """A coupled group (depthwise block, SE gate, fan-out, grouped conv; residual stream with
    --coupled prune) as the budget sees it: removing channels is simulated by masking them at
    every consumer's input (``points``; where the data-free plan restores a removed channel's
    mean in the consumer's bias, ``means`` feed it in its place), ranked as the prune pass ranks."""

    group: Group
    names: list[str]  # the producers' names, each with its weight and output (what ratio_for matches)
    channels: int
    ranking: GroupRanking
    points: list[tuple[str, int]]
    means: list[np.ndarray | None]

    @property
    def name(self) -> str:
        return " + ".join(p.name for p in self.group.producers)

    @property
    def op(self) -> str:
        return self.group.producers[0].node.op_type

    def masks(self, keep: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per point, (per-channel scale, offset) with ``keep`` channels kept."""
        on = np.zeros(self.channels)
        on[self.ranking.kept(keep)] = 1.0
        return [(on, np.zeros(self.channels) if mean is None else mean * (1.0 - on)) for mean in self.means]


def chain_plan_options(options: CompressOptions, chain: Chain) -> PlanOptions:
    """The plan the merge pass will make for this chain (passes/merge_channels.py)."""
    from .passes.merge_channels import is_dense

    method = options.method if chain.mergeable else "prune"
    return options.plan_options(method, bn_hidden=chain.bn is None and chain.producer.node.op_type == "Conv",
                                dense=is_dense(chain), channels=chain.channels)


def budget_terms(index: GraphIndex, chains: list[Chain], what: str, fold_bn: bool,
                 units: list[GroupUnit] = ()) -> list[BudgetTerm]:
    """What the chains' and groups' layers spend (MACs or parameters), each part with the budget
    units (chains, then groups) whose channels it scales with: a layer's weight and MACs with the
    unit it produces for and the unit it consumes from (a depthwise conv's with its group's once);
    a bias, BN statistics (when BN stays in the graph; folded they leave whatever the
    allocation) and per-channel PRelu slopes with their unit."""
    from .passes.merge_channels import current_bias

    macs = node_macs(index.model) or {} if what == "macs" else {}
    layers: dict[str, list] = {}  # node name -> [weight, {units}]
    extra = []

    def touch(name: str, weight: str, unit: int) -> None:
        layers.setdefault(name, [weight, set()])[1].add(unit)

    def per_channel(names: list[str], n: int, unit: int) -> None:
        extra.extend(BudgetTerm(float(n), (unit,)) for name in names if name and index.size(name) == n)

    for i, chain in enumerate(chains):
        for layer in (chain.producer, chain.consumer):
            touch(layer.name, layer.weight, i)
        if what == "params":
            bias = current_bias(chain.producer)
            names = [bias] if bias is not None else []
            bns = [chain.bn] + [node for node in chain.path if node.op_type == "BatchNormalization"]
            if not fold_bn:
                names += [name for bn in bns if bn is not None for name in bn.input[1:5]]
            names += [node.input[1] for node in chain.path if node.op_type == "PRelu"]
            per_channel(names, chain.channels, i)
    for j, unit in enumerate(units, start=len(chains)):
        g = unit.group
        for layer in g.producers + g.driven + g.consumers:
            touch(layer.name, layer.weight, j)
        for node in g.depthwise:
            touch(node.name or node.output[0], node.input[1], j)
        if what == "params":
            names = [current_bias(p) for p in g.producers + g.driven]
            names += [node.input[2] for node in g.depthwise if len(node.input) > 2]
            names += [name for node, name in g.per_channel if not (fold_bn and node.op_type == "BatchNormalization")]
            per_channel(names, unit.channels, j)
    if what == "macs":
        return [BudgetTerm(float(macs.get(name, 0)), tuple(sorted(u))) for name, (_, u) in layers.items()] + extra
    return [BudgetTerm(float(index.size(weight)), tuple(sorted(u))) for weight, u in layers.values()] + extra


def budget_chains(index: GraphIndex, options: CompressOptions) -> list[Chain]:
    """The chains a budget may shrink: those --exclude does not name."""
    return [c for c in find_chains(index)[0] if options.ratio_for(c.match_names()) is not None]


class _Unrecorded:
    """A context for the group analysis that keeps no record: the prune pass gives the reasons."""

    @staticmethod
    def skip(node: str, reason: str) -> None:
        pass


def budget_group_units(index: GraphIndex, options: CompressOptions) -> list[GroupUnit]:
    """The coupled groups a budget may shrink: those the prune pass would prune at some ratio
    with these options (so residual streams only with --coupled prune), whose members
    --layer-ratio does not pin, and whose removals a mask at the consumers' inputs simulates
    (not groups reached through Concat or Split ranges: the pass sizes those as it goes)."""
    from .passes.prune_coupled import STATISTICS, candidate_groups, group_names, rank_group

    stats_of = functools.cache(lambda: STATISTICS(index))
    units = []
    for group, _, n in candidate_groups(index, options, _Unrecorded()):
        names = [name for member in group_names(group) for name in member]
        if group.views or group.splits or group.parts or group.split_of or options.pinned(names):
            continue
        points = group_points(index, group, n)
        if points is None:
            continue
        ranking = rank_group(index, group, n, options, stats_of)
        means = [None] * len(points)
        if ranking.anchored:  # the prune pass restores these means in the consumers' biases
            by_tensor = {c.node.input[0]: mean[:, 0] for c, _, mean, _ in ranking.moments if mean.shape[1] == 1}
            means = [by_tensor.get(t) for t, _ in points]
        units.append(GroupUnit(group, names, n, ranking, points, means))
    return units


def group_points(index: GraphIndex, group: Group, n: int) -> list[tuple[str, int]] | None:
    """(tensor, channel axis) of every distinct input its consumers read the group's channels
    from, one channel per feature; None where a consumer reads them otherwise (after a Flatten)."""
    points = {}
    for c in group.consumers:
        features = int(index.initializers[c.weight].dims[c.in_axis]) * conv_groups(c.node)
        if features != n or not c.node.input or index.is_weight(c.node.input[0]):
            return None
        points[c.node.input[0]] = 1 if c.node.op_type in ("Conv", "ConvTranspose") else -1
    return list(points.items()) or None


def chain_output(chain: Chain) -> str:
    """The consumer's output, where the plan's error is measured (after a MatMul's bias Add)."""
    return chain.consumer.output or chain.consumer.node.output[0]


def chain_curves(index: GraphIndex, chains: list[Chain], options: CompressOptions, progress=None,
                 source: str = "data", units: list[GroupUnit] = ()) -> list[ChainCurve]:
    """Every chain's cost curve, then those of the groups in ``units`` that can be measured;
    ``source`` (api.resolve_calibration) names what ``options.calibration`` holds, so that a
    curve measured on synthetic images says so.

    ``options.sensitivity`` "output": measured at the model's outputs (OutputProbe), on the
    calibration samples (real or synthetic) or, with --calibration none, on made-up inputs;
    where that cannot run, and with "consumer": the plan's predicted error relative to the consumer's output, a consumer that feeds a residual
    Add scaled with calibration by its share of the stream; "combined": the geometric mean of
    the two. "auto" (default): output, but combined where the plan is data-free (--calibration
    none) and every layer has BatchNormalization statistics: made-up inputs reach the
    network-level effects but not real data's statistics, which the plan's model of the
    activations does (BN-kept CIFAR ResNets, --target-macs 0.5, --calibration none: 56.7 / 71.3 /
    84.2 % top-1, BENCHMARKS.md; with the curves measured on 1/f noise, 53.3 / 74.9 / 76.5 % against
    20.2 / 66.2 / 77.4 with output alone and 49.3 / 66.0 / 72.3 with consumer alone; BN folded,
    combined does not help). A group's predicted curve is the prune plan's, where the data-free model
    has its consumers' moments (not residual streams); a group with neither curve is left out."""
    rating = resolved_sensitivity(options, chains)
    if rating == "combined":
        measured = chain_curves(index, chains, dataclasses.replace(options, sensitivity="output"), progress, source,
                                units)
        predicted = chain_curves(index, chains, dataclasses.replace(options, sensitivity="consumer"), progress, source,
                                 units)
        by_layer = {p.layer: p for p in predicted}  # every chain is in both; a group in either or both
        return [m if m.layer not in by_layer else dataclasses.replace(
                    m, cost=np.sqrt(np.maximum(m.cost, 0.0) * np.maximum(by_layer[m.layer].cost, 0.0)),
                    measured_on=m.measured_on and m.measured_on + " x predicted") for m in measured]
    return _single_curves(index, chains, dataclasses.replace(options, sensitivity=rating), progress, source, units)


def resolved_sensitivity(options: CompressOptions, chains: list[Chain]) -> str:
    """What "auto" means for these chains (chain_curves); other choices as given."""
    if options.sensitivity != "auto":
        return options.sensitivity
    data_free = options.calibration is None
    return "combined" if data_free and chains and all(c.bn is not None for c in chains) else "output"


def _single_curves(index: GraphIndex, chains: list[Chain], options: CompressOptions, progress=None,
                   source: str = "data", units: list[GroupUnit] = ()) -> list[ChainCurve]:
    from .passes.merge_channels import producer_arrays

    model = index.model
    probe = None
    if options.sensitivity == "output":
        probe = OutputProbe.build(index, chains, options, _apart(index, chains, units))
    if probe is not None:
        on = "calibration" if options.calibration is not None and source == "data" else "synthetic"
        names = [c.name for c in chains] + [u.name for u in probe.units]
        todo = range(len(names)) if progress is None else progress(range(len(names)), desc="output curves",
                                                                   unit="layer")
        costs = [probe.curve(i) for i in todo]
        return [ChainCurve(c.name, c.match_names(), c.channels, cost, measured_on=on, op=c.producer.node.op_type)
                for c, cost in zip(chains, costs)] + [
                ChainCurve(u.name, u.names, u.channels, cost, measured_on=on, op=u.op, multiple=u.group.blocks,
                           group=u) for u, cost in zip(probe.units, costs[len(chains):])]
    predicted = [u for u in units if u.ranking.costs is not None]
    if len(predicted) < len(units):
        log.info("budget: %d coupled group(s) left out (no model of their consumers' inputs predicts their "
                 "cost, and the outputs cannot be measured here)", len(units) - len(predicted))
    shares = {} if options.calibration is None else stream_shares(
        index, chains, match_inputs(graph_inputs(model), options.calibration, "--calibration"))
    curves = []
    for chain in (chains if progress is None else progress(chains, desc="cost curves", unit="layer")):
        arrays = producer_arrays(index, chain, consumer_norms=True, consumer_rows=True)
        cost = planned_curve(arrays, chain_plan_options(options, chain)) * shares.get(chain.name, 1.0)
        curves.append(ChainCurve(chain.name, chain.match_names(), chain.channels, cost, shares.get(chain.name),
                                 op=chain.producer.node.op_type))
    return curves + [ChainCurve(u.name, u.names, u.channels, predicted_group_curve(u.ranking, u.channels), op=u.op,
                                multiple=u.group.blocks, group=u) for u in predicted]


def predicted_group_curve(ranking: "GroupRanking", n: int) -> np.ndarray:
    """cost[k]: the prune plan's predicted error with k of the ``n`` channels removed, relative to
    what all of them give the consumers (the chains' consumer curves are relative errors too)."""
    from .math.propagate import relative_error

    return np.array([relative_error(ranking.costs, ranking.kept(n - k)) for k in range(n)])


def _apart(index: GraphIndex, chains: list[Chain], units: list[GroupUnit]) -> list[GroupUnit]:
    """The units whose points no chain or earlier unit feeds in at (a tensor the probe rewired
    twice would lose the first map)."""
    taken = {p[0] for p in (injection_point(index, c) for c in chains) if p is not None}
    kept = []
    for unit in units:
        tensors = {t for t, _ in unit.points}
        if not tensors & taken:
            kept.append(unit)
            taken |= tensors
    return kept


def residual_sum(index: GraphIndex, chain: Chain) -> tuple[str, str] | None:
    """(the branch, the sum) where the consumer's output, directly or through a
    BatchNormalization, is added to a residual stream; None where it is not."""
    branch = chain_output(chain)
    reader = index.sole_reader(branch)
    if isinstance(reader, onnx.NodeProto) and reader.op_type == "BatchNormalization":
        branch = reader.output[0]
        reader = index.sole_reader(branch)
    if isinstance(reader, onnx.NodeProto) and reader.op_type == "Add" and len(reader.input) == 2:
        return branch, reader.output[0]
    return None


def stream_shares(index: GraphIndex, chains: list[Chain], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """E|branch|^2 / E|sum|^2 on ``feeds`` for every chain whose consumer feeds a residual Add.

    A consumer's curve is relative to its own output; where that output is added to a
    residual stream, the network sees the error relative to the sum. A branch that carries
    little of its stream can lose much of itself; one that carries most of it (a
    downsampling block) cannot."""
    from .calibration import truncated

    pairs = {c.name: residual_sum(index, c) for c in chains}
    pairs = {k: v for k, v in pairs.items() if v is not None}
    if not pairs:
        return {}
    taps = list(dict.fromkeys(t for pair in pairs.values() for t in pair))
    session = make_session(truncated(index.model, taps), optimize=True)
    energy = dict.fromkeys(taps, 0.0)
    first = session.get_inputs()[0].shape
    batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else 64  # a fixed batch: its size
    total = len(next(iter(feeds.values()))) // batch * batch
    for part in CalibrationSet({k: v[:total] for k, v in feeds.items()}, batch, 0).batches():
        values = session.run(taps, {i.name: part[i.name] for i in session.get_inputs()})
        for t, v in zip(taps, values):
            energy[t] += float(np.sum(np.square(v, dtype=np.float64)))
    return {k: energy[b] / max(energy[s], 1e-30) for k, (b, s) in pairs.items()}


def sensitivity_used(curves: list[ChainCurve]) -> str:
    """output, consumer or combined: what rated the layers (output may fall back to consumer)."""
    on = curves[0].measured_on if curves else None
    return "consumer" if not on else "combined" if on.endswith("predicted") else "output"


def allocate_budget(model: onnx.ModelProto, options: CompressOptions, report: dict, progress=None,
                    source: str = "data") -> CompressOptions:
    """Options whose per-layer ratios meet ``options.target``; the allocation goes to ``report``.
    ``source``: what ``options.calibration`` holds (resolve_calibration's name for it)."""
    what, fraction = options.target
    total = count_macs(model) if what == "macs" else count_parameters(model)
    if not total:
        raise UsageError("--target-macs needs MAC counts, and shape inference failed on this model: "
                         "use --target-params")
    index = GraphIndex(model)
    chains = budget_chains(index, options)
    curves = chain_curves(index, chains, options, progress, source, budget_group_units(index, options))
    units = [c.group for c in curves if c.group is not None]

    def budget_groups(options):
        return [BudgetGroup(c.cost, options.kept_channels(c.channels, options.ratio_for(c.names), c.op, c.multiple)
                            if options.pinned(c.names) else None, *options.alignment(c.channels, c.op, c.multiple))
                for c in curves]

    groups = budget_groups(options)
    terms = budget_terms(index, chains, what, options.fold_bn, units)
    need = total * (1.0 - fraction)
    try:
        try:
            keeps = allocate(groups, terms, need, options.round_to or 1)
        except BudgetUnreachable:
            if not any(g.floor > 1 for g in groups):
                raise
            # the target outweighs latency: layers a block wide may go below a block, and off whole blocks
            log.info("--target-%s %g needs convs narrower than a channel block: --round-to auto's floor is off",
                     what, fraction)
            options = dataclasses.replace(options, block_floor=False)
            groups = budget_groups(options)
            keeps = allocate(groups, terms, need, options.round_to or 1)
    except BudgetUnreachable as exc:
        streams = "" if options.coupled == "prune" else "; residual streams stay whole (--coupled prune budgets them too)"
        raise UsageError(f"--target-{what} {fraction:g} cannot be met: removing every channel the {len(chains)} "
                         f"chains and {len(units)} coupled groups allow (at least {options.round_to or 1} per layer, "
                         f"pinned layers as given) keeps {100 * (1 - exc.saved / total):.1f} % of the {what}"
                         f"{streams}") from None
    full = [c.channels for c in curves]
    allocated, rows = {}, []
    for i, (c, g, kept) in enumerate(zip(curves, groups, keeps)):
        ratio = 1.0 - kept / c.channels
        if g.keep is None:  # a group's ratio goes to each of its producers (prune_coupled.group_ratios)
            allocated.update(dict.fromkeys([c.layer] if c.group is None else
                                           [p.node.name or p.weight for p in c.group.group.producers], ratio))
        rows.append({"layer": c.layer, "kind": c.kind,
                     "channels": c.channels, "kept": kept, "ratio": round(ratio, 4),
                     "pinned": g.keep is not None, "predicted_error": float(c.cost[c.channels - kept]),
                     f"{what}_per_channel": per_channel(terms, groups, full, i),
                     "stream_share": None if c.share is None else round(c.share, 4), "measured_on": c.measured_on})
    kept_fraction = 1 - (spend(terms, groups, full) - spend(terms, groups, keeps)) / total
    report["allocation"] = {"target": what, "fraction": fraction, "predicted_fraction": round(kept_fraction, 6),
                            "sensitivity": sensitivity_used(curves),
                            "groups": rows, "block_floor": options.block_floor}
    log.info("allocation: %.4f of the %s kept (target %g)", kept_fraction, what, fraction)
    return dataclasses.replace(options, ratio=0.0, allocated=allocated)


def sensitivity(model: onnx.ModelProto, options: CompressOptions, progress=None) -> dict:
    """Every chain's cost curve with what one of its channels saves: what ``onnx-merge
    sensitivity`` shows, and what a budget allocates on."""
    from .api import canonicalize, resolve_calibration
    from .manager import Context

    model = copy.deepcopy(model)
    calibration, source = resolve_calibration(model, options, budget=True)
    options = dataclasses.replace(options, calibration=calibration)
    canonicalize().run(model, Context(options=None))
    index = GraphIndex(model)
    chains = budget_chains(index, options)
    curves = chain_curves(index, chains, options, progress, source, budget_group_units(index, options))
    units = [c.group for c in curves if c.group is not None]
    groups = [BudgetGroup(c.cost) for c in curves]
    full = [c.channels for c in curves]
    per = {what: budget_terms(index, chains, what, options.fold_bn, units) for what in ("macs", "params")}
    return {"macs": count_macs(model), "params": count_parameters(model), "calibrated": options.calibration is not None,
            "calibration_source": source,
            "groups": [{"layer": c.layer, "kind": c.kind,
                        "channels": c.channels,
                        "macs_per_channel": per_channel(per["macs"], groups, full, i),
                        "params_per_channel": per_channel(per["params"], groups, full, i),
                        "stream_share": c.share, "measured_on": c.measured_on,
                        "curve": [round(float(v), 6) for v in c.cost]}
                       for i, c in enumerate(curves)]}


def plot_curves(result: dict) -> bytes:
    """``sensitivity``'s curves, one line per layer, as PNG bytes."""
    import io

    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'onnx-merge[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["groups"]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(groups), 1)))
    for g, color in zip(groups, colors):
        ax.plot(100 * np.arange(g["channels"]) / g["channels"], g["curve"], color=color, label=g["layer"])
    measured = any(g.get("measured_on") for g in groups)
    ax.set(xlabel="channels removed (%)", title="cost per layer",
           ylabel="change in the model's outputs (relative)" if measured else "predicted relative error at the consumer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=max(1, len(groups) // 20))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def probe_inputs(model: onnx.ModelProto, calibration: dict | None, samples: int = PROBE_SAMPLES,
                 seed: int = 0) -> dict[str, np.ndarray] | None:
    """What the output curves are measured on: the first calibration samples, or, data-free,
    made-up inputs of unit variance per channel (``synthetic_inputs``: dead-leaves images, 1/f
    noise for other inputs; a model trained on normalised inputs sees about that scale). None
    where the model takes an input nothing made up can stand for (integer ids, a shape not fixed
    beyond the batch)."""
    specs = graph_inputs(model)
    if calibration is not None:
        feeds = match_inputs(specs, calibration, "--calibration")
        return {k: v[:samples] for k, v in feeds.items()}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dims = spec.shape[1:]
        if spec.type not in FLOAT_TYPES or not spec.shape or \
                not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        first = spec.shape[0]
        count = samples if not isinstance(first, int) or first <= 0 else max(first, samples // first * first)
        feeds[spec.name] = synthetic_inputs((count, *dims), rng)
    return feeds or None


def _moves_channels(node: onnx.NodeProto) -> bool:
    """Whether the channels may leave their axis past ``node`` (a reshape, or a reduction
    that drops axes): the probe's map must go in before it."""
    return rule(node.op_type).kind in (RESHAPE, REDUCE)


def injection_point(index: GraphIndex, chain: Chain) -> tuple[str, int] | None:
    """(tensor, channel axis) where the chain's plan rebuilds its channels: the last tensor of
    the chain's straight path from the producer, before the consumer or any reshaping op,
    past the BN and the activation; None where the path branches before it gets there."""
    tensor = chain.producer.output or chain.producer.node.output[0]
    members = {id(n) for n in chain.path} | ({id(chain.bn)} if chain.bn is not None else set())
    walked = set()
    while True:
        reader = index.sole_reader(tensor)
        if not isinstance(reader, onnx.NodeProto) or id(reader) not in members or _moves_channels(reader):
            break
        walked.add(id(reader))
        tensor = reader.output[0]
    # every member before a reshaping op must lie on the walk (the activation among them)
    before = chain.path[:next((i for i, n in enumerate(chain.path) if _moves_channels(n)), len(chain.path))]
    if any(id(n) not in walked for n in before) or (chain.bn is not None and id(chain.bn) not in walked):
        return None
    return tensor, 1 if chain.producer.node.op_type in ("Conv", "ConvTranspose") else -1


class OutputProbe:
    """The model with an N x N map fed in at every chain's injection point, in one session:
    what the model computes on ``feeds`` when some chains are planned as the merge pass will
    plan them (their rebuilt channels a_hat = A a + c in place of a), the rest left whole.
    Groups (``units``) are fed masks at their consumers' inputs: their channels pruned as the
    prune pass prunes them. Unit i is chain i, then group i - len(chains).

    A unit's cost curve measured here is in the same units for every layer, early or late, in
    a residual stream or not: the change in the model's outputs (``output_change``)."""

    def __init__(self, index: GraphIndex, chains: list[Chain], options: CompressOptions,
                 feeds: dict[str, np.ndarray], points: list[tuple[str, int]], units: list[GroupUnit] = ()):
        from .passes.merge_channels import producer_arrays

        self.chains, self.units, self.feeds = chains, list(units), feeds
        self.points, self.unit_points = list(points), [[i] for i in range(len(chains))]  # a chain's one point
        for u in self.units:  # a group's points follow
            self.unit_points.append(list(range(len(self.points), len(self.points) + len(u.points))))
            self.points += u.points
        self.widths = [c.channels for c in chains] + [u.channels for u in self.units]
        self.arrays = [producer_arrays(index, c, consumer_norms=True, consumer_rows=True) for c in chains]
        self.options = [chain_plan_options(options, c) for c in chains]
        self._plans: dict[tuple[int, int], object] = {}
        model = copy.deepcopy(index.model)
        fixed = graph_inputs(model)[0].shape[:1]
        samples = len(next(iter(feeds.values())))
        self.batch = fixed[0] if fixed and isinstance(fixed[0], int) and fixed[0] > 0 else samples
        self.total = samples // self.batch * self.batch
        tensors = [t for t, _ in self.points]
        first = make_session(truncated(model, tensors), optimize=True)
        self.ranks = {t: v.ndim for t, v in zip(tensors, first.run(tensors, {k: v[:self.batch] for k, v in feeds.items()}))}
        # with calibration the consumer is refitted on these activations: plan as that refit sees them
        self.grams = self._moments(first, self.points[:len(chains)]) if options.calibration is not None else None
        graph = model.graph
        self.names, added = [], {}
        for i, (t, axis) in enumerate(self.points):
            a, c, out = f"__probe_a{i}", f"__probe_c{i}", f"__probe_{i}"
            self.names.append((a, c))
            graph.input.extend([onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None),
                                onnx.helper.make_tensor_value_info(c, onnx.TensorProto.FLOAT, None)])
            for node in graph.node:
                for j, name in enumerate(node.input):
                    if name == t:
                        node.input[j] = out
            # a group's mask is per channel: Mul, not an N x N map (which doubled MobileNet's MACs)
            op = "Mul" if i >= len(chains) else "Conv" if axis == 1 else "MatMul"
            added[t] = ([onnx.helper.make_node("Conv", [t, a, c], [out])] if op == "Conv" else
                        [onnx.helper.make_node(op, [t, a], [out + "_m"]),
                         onnx.helper.make_node("Add", [out + "_m", c], [out])])
        nodes = [n for t in added if t not in index.producer for n in added[t]]
        for node in graph.node:
            nodes += [node] + [n for t in node.output if t in added for n in added[t]]
        del graph.node[:]
        graph.node.extend(nodes)
        self.session = make_session(model.SerializeToString(), optimize=True)
        self.identity = {}
        for i, n in enumerate(self.widths):
            for point in self.unit_points[i]:
                self.identity.update(self._maps(point, np.eye(n) if i < len(chains) else np.ones(n), np.zeros(n)))
        self.reference = self._run({})

    @classmethod
    def build(cls, index: GraphIndex, chains: list[Chain], options: CompressOptions,
              units: list[GroupUnit] = ()) -> "OutputProbe | None":
        """None where there is nothing to run it on, a chain has no injection point, or the runs
        would take more than PROBE_MACS with PROBE_MIN_SAMPLES samples (a log line says so)."""
        widths = [c.channels for c in chains] + [u.channels for u in units]
        runs = 1 + sum(len(probe_counts(n, PROBE_POINTS)) - 1 for n in widths)
        macs = count_macs(index.model) or 0
        samples = PROBE_SAMPLES if not macs else min(PROBE_SAMPLES, int(PROBE_MACS / (macs * runs)))
        if samples < PROBE_MIN_SAMPLES:
            log.info("budget: output curves would take %d runs of %.3g MACs on %d samples: the predicted "
                     "consumer curves instead", runs, macs, PROBE_MIN_SAMPLES)
            return None
        feeds = probe_inputs(index.model, options.calibration, samples)
        points = [injection_point(index, c) for c in chains]
        if feeds is None or not widths or any(p is None for p in points):
            return None
        return cls(index, chains, options, feeds, points, units)

    def _moments(self, session, points: list[tuple[str, int]]) -> list[np.ndarray]:
        """Each of ``points``' measured [a, 1] moments over the probe's samples."""
        axes = dict(points)
        sums = dict.fromkeys(axes, 0.0)
        for s in range(0, self.total, self.batch):
            values = session.run(list(axes), {k: v[s:s + self.batch] for k, v in self.feeds.items()})
            for (t, axis), v in zip(axes.items(), values):
                sums[t] = sums[t] + measured_moments(v, axis % v.ndim)
        return [sums[t] / max(self.total // self.batch, 1) for t, _ in points]

    def _maps(self, point: int, a: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
        """The feeds of a point: a chain's N x N map ``a`` (a 1x1 Conv's weight, or a MatMul's), or
        a group's per-channel scale ``a`` (a vector along the channel axis); the offset ``c``."""
        t, axis = self.points[point]
        if a.ndim == 1:
            a = a.reshape(a.shape + (1,) * (self.ranks[t] - 2)) if axis == 1 else a
            c = c.reshape(a.shape)
        else:
            a = a.reshape(a.shape + (1,) * (self.ranks[t] - 2)) if axis == 1 else a.T
        return {self.names[point][0]: a.astype(np.float32), self.names[point][1]: c.astype(np.float32)}

    def _run(self, extra: dict) -> list[np.ndarray]:
        parts = [self.session.run(None, {**{k: v[s:s + self.batch] for k, v in self.feeds.items()},
                                         **self.identity, **extra})
                 for s in range(0, self.total, self.batch)]
        return [np.concatenate(p) for p in zip(*parts)]

    def plan(self, i: int, keep: int):
        if (i, keep) not in self._plans:
            plan = self._refit_plan(i, keep)
            self._plans[i, keep] = plan if plan is not None else plan_layer(self.arrays[i], keep, self.options[i])
        return self._plans[i, keep]

    def _refit_plan(self, i: int, keep: int):
        """The regression of the removed channels on the kept ones in the measured moments; None
        where they are ill-conditioned (the data-free plan instead)."""
        rows = self.arrays[i].consumer_rows
        if self.grams is None or rows is None:
            return None
        try:
            return regress_plan(self.grams[i], keep, consumer_metric_root(rows), self.options[i].ridge)
        except np.linalg.LinAlgError:
            return None

    def change(self, keeps: dict[int, int]) -> float:
        """The output change with unit i keeping keeps[i] channels (all at once)."""
        extra = {}
        for i, keep in keeps.items():
            if keep >= self.widths[i]:
                continue
            if i < len(self.chains):
                extra.update(self._maps(i, *reconstruction(self.plan(i, keep))))
                continue
            for point, (a, c) in zip(self.unit_points[i], self.units[i - len(self.chains)].masks(keep)):
                extra.update(self._maps(point, a, c))
        return output_change(self._run(extra), self.reference) if extra else 0.0

    def curve(self, i: int, points: int = PROBE_POINTS) -> np.ndarray:
        n = self.widths[i]
        counts = probe_counts(n, points)
        return measured_curve(counts, np.array([self.change({i: n - k}) for k in counts]), n)
