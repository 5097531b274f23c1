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
import logging
from dataclasses import dataclass

import numpy as np
import onnx

from .calibration import CalibrationSet
from .errors import UsageError
from .graph import GraphIndex
from .groups import Chain, find_chains
from .math import PlanOptions, keep_count
from .math.budget import BudgetGroup, BudgetTerm, BudgetUnreachable, allocate, per_channel, spend
from .math.sensitivity import planned_curve
from .options import CompressOptions
from .runtime import graph_inputs, make_session, match_inputs
from .stats import count_macs, count_parameters, node_macs

log = logging.getLogger("onnx_merge")


@dataclass
class ChainCurve:
    """One chain as the budget sees it: ``cost[k]`` after removing k channels."""

    layer: str
    names: list[str]
    channels: int
    cost: np.ndarray
    share: float | None = None  # of the residual stream its consumer feeds, measured on calibration data


def chain_plan_options(options: CompressOptions, chain: Chain) -> PlanOptions:
    """The plan the merge pass will make for this chain (passes/merge_channels.py)."""
    from .passes.merge_channels import is_dense

    method = options.method if chain.mergeable else "prune"
    return options.plan_options(method, bn_hidden=chain.bn is None and chain.producer.node.op_type == "Conv",
                                dense=is_dense(chain), channels=chain.channels)


def budget_terms(index: GraphIndex, chains: list[Chain], what: str, fold_bn: bool) -> list[BudgetTerm]:
    """What the chains' layers spend (MACs or parameters), each part with the groups whose
    channels it scales with: a layer's weight and MACs with the chain it produces for and the
    chain it consumes from; a bias, BN statistics (when BN stays in the graph; folded they leave
    whatever the allocation) and per-channel PRelu slopes with their chain."""
    from .passes.merge_channels import current_bias

    macs = node_macs(index.model) or {} if what == "macs" else {}
    layers: dict[str, list] = {}  # node name -> [node, {groups}]
    extra = []
    for i, chain in enumerate(chains):
        for layer in (chain.producer, chain.consumer):
            layers.setdefault(layer.name, [layer, set()])[1].add(i)
        if what == "params":
            n = chain.channels
            bias = current_bias(chain.producer)
            names = [bias] if bias is not None else []
            bns = [chain.bn] + [node for node in chain.path if node.op_type == "BatchNormalization"]
            if not fold_bn:
                names += [name for bn in bns if bn is not None for name in bn.input[1:5]]
            names += [node.input[1] for node in chain.path if node.op_type == "PRelu"]
            extra += [BudgetTerm(float(n), (i,)) for name in names if index.array(name).size == n]
    if what == "macs":
        return [BudgetTerm(float(macs.get(name, 0)), tuple(sorted(g))) for name, (_, g) in layers.items()] + extra
    return [BudgetTerm(float(index.array(layer.weight).size), tuple(sorted(g))) for layer, g in layers.values()] + extra


def budget_chains(index: GraphIndex, options: CompressOptions) -> list[Chain]:
    """The chains a budget may shrink: those --exclude does not name."""
    return [c for c in find_chains(index)[0] if options.ratio_for(c.match_names()) is not None]


def chain_output(chain: Chain) -> str:
    """The consumer's output, where the plan's error is measured (after a MatMul's bias Add)."""
    return chain.consumer.output or chain.consumer.node.output[0]


def chain_curves(index: GraphIndex, chains: list[Chain], options: CompressOptions, progress=None) -> list[ChainCurve]:
    """Every chain's data-free cost curve; with ``options.calibration``, a consumer that feeds a
    residual Add has its curve scaled by its share of the stream."""
    from .passes.merge_channels import producer_arrays

    model = index.model
    shares = {} if options.calibration is None else stream_shares(
        index, chains, match_inputs(graph_inputs(model), options.calibration, "--calibration"))
    curves = []
    for chain in (chains if progress is None else progress(chains, desc="cost curves", unit="layer")):
        arrays = producer_arrays(index, chain, consumer_norms=True, consumer_rows=True)
        cost = planned_curve(arrays, chain_plan_options(options, chain)) * shares.get(chain.name, 1.0)
        curves.append(ChainCurve(chain.name, chain.match_names(), chain.channels, cost, shares.get(chain.name)))
    return curves


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


def allocate_budget(model: onnx.ModelProto, options: CompressOptions, report: dict, progress=None) -> CompressOptions:
    """Options whose per-layer ratios meet ``options.target``; the allocation goes to ``report``."""
    what, fraction = options.target
    total = count_macs(model) if what == "macs" else count_parameters(model)
    if not total:
        raise UsageError("--target-macs needs MAC counts, and shape inference failed on this model: "
                         "use --target-params")
    index = GraphIndex(model)
    chains = budget_chains(index, options)
    curves = chain_curves(index, chains, options, progress)
    ops = {c.name: c.producer.node.op_type for c in chains}
    groups = [BudgetGroup(c.cost, options.kept_channels(c.channels, options.ratio_for(c.names), ops[c.layer])
                          if options.pinned(c.names) else None, step=options.channel_step(c.channels, ops[c.layer]))
              for c in curves]
    terms = budget_terms(index, chains, what, options.fold_bn)
    try:
        keeps = allocate(groups, terms, total * (1.0 - fraction), options.round_to or 1)
    except BudgetUnreachable as exc:
        raise UsageError(f"--target-{what} {fraction:g} cannot be met: removing every channel the chains allow "
                         f"(at least {options.round_to or 1} per layer, pinned layers as given) keeps "
                         f"{100 * (1 - exc.saved / total):.1f} % of the {what}") from None
    full = [c.channels for c in curves]
    allocated, rows = {}, []
    for i, (c, g, kept) in enumerate(zip(curves, groups, keeps)):
        ratio = 1.0 - kept / c.channels
        if g.keep is None:
            allocated[c.layer] = ratio
        rows.append({"layer": c.layer, "channels": c.channels, "kept": kept, "ratio": round(ratio, 4),
                     "pinned": g.keep is not None, "predicted_error": float(c.cost[c.channels - kept]),
                     f"{what}_per_channel": per_channel(terms, groups, full, i),
                     "stream_share": None if c.share is None else round(c.share, 4)})
    kept_fraction = 1 - (spend(terms, groups, full) - spend(terms, groups, keeps)) / total
    report["allocation"] = {"target": what, "fraction": fraction, "predicted_fraction": round(kept_fraction, 6),
                            "groups": rows}
    log.info("allocation: %.4f of the %s kept (target %g)", kept_fraction, what, fraction)
    return dataclasses.replace(options, ratio=0.0, allocated=allocated)


def sensitivity(model: onnx.ModelProto, options: CompressOptions, progress=None) -> dict:
    """Every chain's cost curve with what one of its channels saves: what ``onnx-merge
    sensitivity`` shows, and what a budget allocates on."""
    from .api import canonicalize
    from .manager import Context

    model = copy.deepcopy(model)
    canonicalize().run(model, Context(options=None))
    index = GraphIndex(model)
    chains = budget_chains(index, options)
    curves = chain_curves(index, chains, options, progress)
    groups = [BudgetGroup(c.cost) for c in curves]
    full = [c.channels for c in curves]
    per = {what: budget_terms(index, chains, what, options.fold_bn) for what in ("macs", "params")}
    return {"macs": count_macs(model), "params": count_parameters(model), "calibrated": options.calibration is not None,
            "groups": [{"layer": c.layer, "channels": c.channels,
                        "macs_per_channel": per_channel(per["macs"], groups, full, i),
                        "params_per_channel": per_channel(per["params"], groups, full, i),
                        "stream_share": c.share, "curve": [round(float(v), 6) for v in c.cost]}
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
    ax.set(xlabel="channels removed (%)", ylabel="predicted relative output error", title="cost per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=max(1, len(groups) // 20))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()
