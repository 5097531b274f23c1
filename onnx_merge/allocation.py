"""A global budget on a model: each chain's cost curve, and the per-layer ratios that meet
``--target-macs`` / ``--target-params`` where removing channels costs least.

From the analysis this reads, per chain, only its names, channel count, what one removed
channel saves and the producer's arrays the planner gets; the curves and the allocation are
NumPy (math/sensitivity.py, math/budget.py). The result is a map layer name -> ratio that
``CompressOptions.ratio_for`` consults, so the passes run as with hand-written ratios.
"""

from __future__ import annotations

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
from .math.calibrate import LeastSquaresFit
from .math.sensitivity import measured_curve, planned_curve
from .options import CompressOptions
from .runtime import graph_inputs, make_session, match_inputs
from .stats import count_macs, count_parameters, node_macs

log = logging.getLogger("onnx_merge")
CALIBRATION_ROWS = 4096  # patch rows per batch and chain entering a measured curve (a curve needs fewer than a fit)


@dataclass
class ChainCurve:
    """One chain as the budget sees it: ``cost[k]`` after removing k channels."""

    layer: str
    names: list[str]
    channels: int
    cost: np.ndarray
    measured: bool = False


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


def chain_curves(index: GraphIndex, chains: list[Chain], options: CompressOptions, progress=None) -> list[ChainCurve]:
    """Every chain's cost curve: data-free, or measured on ``options.calibration``."""
    from .passes.merge_channels import producer_arrays

    model = index.model
    measured = measured_costs(model, chains, options) if options.calibration is not None else {}
    curves = []
    for chain in (chains if progress is None else progress(chains, desc="cost curves", unit="layer")):
        cost = measured.get(chain.name)
        if cost is None:
            arrays = producer_arrays(index, chain, consumer_norms=True, consumer_rows=True)
            cost = planned_curve(arrays, chain_plan_options(options, chain))
        curves.append(ChainCurve(chain.name, chain.match_names(), chain.channels, cost, chain.name in measured))
    return curves


def measured_costs(model: onnx.ModelProto, chains: list[Chain], options: CompressOptions) -> dict[str, np.ndarray]:
    """Curves measured on the calibration inputs: per consumer, its inputs in the original
    model against its outputs, eliminated channel by channel as the calibrated pass selects.
    A consumer the calibrated pass cannot fit keeps its data-free curve."""
    from .passes.calibrate_consumers import MAX_FEATURES, _features, _matrix, channel_major, truncated

    index = GraphIndex(model)
    fits, weights = {}, {}
    for chain in chains:
        layer = chain.consumer
        if layer.node.op_type in ("Conv", "Gemm", "MatMul"):
            w = _matrix(layer, index.array(layer.weight).astype(np.float64)) * layer.alpha
            if w.shape[1] <= MAX_FEATURES:
                weights[chain.name] = w
                fits[chain.name] = [LeastSquaresFit(w.shape[1], w.shape[0]), 0.0]
    by_name = {c.name: c for c in chains if c.name in fits}
    if not by_name:
        return {}
    taps = list(dict.fromkeys(c.consumer.node.input[0] for c in by_name.values()))
    session = make_session(truncated(model, taps), optimize=True)
    feeds = match_inputs(graph_inputs(model), options.calibration, "--calibration")
    rng = np.random.default_rng(0)
    for part in CalibrationSet(feeds, options.calibration_batch, 0).batches():
        values = dict(zip(taps, session.run(taps, {i.name: part[i.name] for i in session.get_inputs()})))
        for name, chain in by_name.items():
            layer = chain.consumer
            x = _features(layer, values[layer.node.input[0]], index.initializers[layer.weight].dims)
            if x is None or x.shape[1] != weights[name].shape[1]:
                fits.pop(name, None)
                continue
            if name not in fits:
                continue
            if chain.interleaved:
                x = x[:, channel_major(chain.channels, x.shape[1] // chain.channels)]
            if len(x) > CALIBRATION_ROWS:
                x = x[rng.choice(len(x), CALIBRATION_ROWS, replace=False)]
            y = x @ (weights[name][:, channel_major(chain.channels, x.shape[1] // chain.channels)].T
                     if chain.interleaved else weights[name].T)
            fits[name][0].add(x, y)
            fits[name][1] += float(np.sum(y * y))
        by_name = {k: v for k, v in by_name.items() if k in fits}
    curves = {}
    for name, (fit, energy) in fits.items():
        curve = measured_curve(fit, by_name[name].channels, energy, options.calibration_ridge) if fit.rows else None
        if curve is not None:
            curves[name] = curve
    return curves


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
    groups = [BudgetGroup(c.cost, keep_count(c.channels, options.ratio_for(c.names), options.round_to)
                          if options.pinned(c.names) else None) for c in curves]
    terms = budget_terms(index, chains, what, options.fold_bn)
    try:
        keeps = allocate(groups, terms, total * (1.0 - fraction), options.round_to)
    except BudgetUnreachable as exc:
        raise UsageError(f"--target-{what} {fraction:g} cannot be met: removing every channel the chains allow "
                         f"(at least {options.round_to} per layer, pinned layers as given) keeps "
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
                     "curve": "measured" if c.measured else "data-free"})
    kept_fraction = 1 - (spend(terms, groups, full) - spend(terms, groups, keeps)) / total
    report["allocation"] = {"target": what, "fraction": fraction, "predicted_fraction": round(kept_fraction, 6),
                            "groups": rows}
    log.info("allocation: %.4f of the %s kept (target %g)", kept_fraction, what, fraction)
    return dataclasses.replace(options, ratio=0.0, allocated=allocated)
