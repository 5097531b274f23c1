"""Remove output channels of a producer and merge what they carried into its consumer.

    P(x; W[N], b[N]) -> [BN] -> Relu -> [pools, Flatten ...] -> C(.; V[M, N])
becomes
    P(x; W[kept], b[kept]) -> [BN[kept]] -> Relu -> [...] -> C(.; V Z^T [M, P])

Exact when every removed row is a positive multiple of its partner (METHOD.md section 1);
the numbers come from ``onnx_merge.math``, this pass only moves arrays in and out.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_merge.datafree import chain_activation, input_model
from onnx_merge.math.compensation import compensate_along
from onnx_merge.math.planner import models_activations
from onnx_merge.graph import GraphIndex, attr
from onnx_merge.groups import Branch, Chain, Layer, find_chains
from onnx_merge.math import (Compensation, PlanOptions, ProducerArrays, plan_layer,
                             rank_kept, ranks_by_criterion)
from onnx_merge.shapes import drop_value_info

log = logging.getLogger("onnx_merge")


def is_dense(chain: Chain) -> bool:
    """A fully connected producer (Gemm/MatMul): its input is one vector, not patches."""
    return chain.producer.node.op_type in ("Gemm", "MatMul")


def activation_slope(index: GraphIndex, chain: Chain) -> float:
    """The negative slope of the chain's activation (0 for a ReLU)."""
    for node in chain.path:
        if node.op_type == "LeakyRelu":
            return float(attr(node, "alpha", 0.01))
        if node.op_type == "PRelu":
            return float(index.array(node.input[1]).reshape(-1)[0])
    return 0.0


def producer_arrays(index: GraphIndex, chain: Chain, consumer_norms: bool = False,
                    consumer_rows: bool = False) -> ProducerArrays:
    p = chain.producer
    w = np.moveaxis(index.array(p.weight), p.out_axis, 0)
    rows = w.reshape(chain.channels, -1)
    if p.alpha != 1.0:
        rows = rows * np.float32(p.alpha)
    bias = None
    if p.bias is not None:
        bias = np.broadcast_to(np.reshape(index.array(p.bias), -1), (chain.channels,)).astype(np.float64) * p.beta
    bn = None
    if chain.bn is not None:
        bn = index.batchnorm(chain.bn)
    norms = rows_v = None
    branches = branches_of(chain)
    if consumer_rows:  # a fan-out: every consumer's columns side by side
        rows_v = np.concatenate([consumer_view(index.array(b.consumer.weight), b.consumer, chain.channels, b.block,
                                               b.interleaved).reshape(chain.channels, -1) for b in branches], axis=1)
    if consumer_norms:
        norms = np.sqrt(sum(input_channel_norms(index.array(b.consumer.weight), b.consumer.in_axis, chain.channels,
                                                b.interleaved) ** 2 for b in branches))
    in_channels = int(index.initializers[p.weight].dims[1]) if p.node.op_type == "Conv" else rows.shape[1]
    return ProducerArrays(weight=rows, bias=bias, bn=bn, consumer_norms=norms, consumer_rows=rows_v,
                          in_channels=in_channels, slope=activation_slope(index, chain),
                          dense=is_dense(chain), activation=chain_activation(index, chain),
                          inputs=input_model(index, p))


def branches_of(chain: Chain) -> list[Branch]:
    """Every consumer of the chain with its layout (one for a chain built by hand)."""
    return chain.branches or [Branch(chain.consumer, chain.block, chain.interleaved)]


def take_channels(index: GraphIndex, name: str, kept: np.ndarray, n: int, axis: int) -> None:
    arr = index.array(name)
    if arr.ndim == 0 or arr.shape[axis] != n:
        return  # a broadcast (per-layer) value: nothing per channel to remove
    index.set_array(name, np.take(arr, kept, axis=axis))


def current_bias(layer: Layer) -> str | None:
    """The layer's bias now: an earlier rewrite may have given it one (a consumer's offset)."""
    if layer.node.op_type == "MatMul":
        return layer.bias
    return layer.node.input[2] if len(layer.node.input) > 2 and layer.node.input[2] else None


def shrink_producer(index: GraphIndex, chain: Chain, kept: np.ndarray) -> None:
    p, n = chain.producer, chain.channels
    take_channels(index, p.weight, kept, n, p.out_axis)
    bias = current_bias(p)
    if bias is not None:
        take_channels(index, bias, kept, n, -1)
    for bn in [chain.bn] + [node for node in chain.path if node.op_type == "BatchNormalization"]:
        if bn is not None:
            for name in bn.input[1:5]:
                take_channels(index, name, kept, n, 0)
    for node in chain.path:
        slopes = index.array(node.input[1]) if node.op_type == "PRelu" else None
        if slopes is not None and slopes.size > 1:  # one per channel, on its only axis longer than 1
            take_channels(index, node.input[1], kept, n, int(np.argmax(slopes.shape)))


def input_channel_norms(weight: np.ndarray, in_axis: int, channels: int, interleaved: bool = False) -> np.ndarray:
    """|V[:, n]|: the consumer's L2 norm over each input channel (its block of features after a
    Flatten), summed a slab at a time in the weight's own layout: a Gemm after a Flatten can be
    hundreds of MB, and flattening it channel-first would copy it whole. Each slab sums in the
    weight's dtype (float32 at least: a float64 einsum casts element by element, 3x slower),
    the slabs in float64."""
    moved = np.moveaxis(weight, in_axis, -1)
    dtype = np.promote_types(weight.dtype, np.float32)
    total = np.zeros(moved.shape[-1])
    for i in range(0, len(moved), 256):
        slab = moved[i:i + 256].reshape(-1, moved.shape[-1]).astype(dtype, copy=False)
        total += np.einsum("rf,rf->f", slab, slab)
    per_channel = total.reshape(-1, channels).sum(axis=0) if interleaved else total.reshape(channels, -1).sum(axis=1)
    return np.sqrt(per_channel)


def consumer_view(weight: np.ndarray, layer: Layer, channels: int, block: int, interleaved: bool = False) -> np.ndarray:
    """(N, B, M, K): channels first, then features per channel, outputs, kernel taps."""
    moved = np.moveaxis(weight, layer.in_axis, 0)
    if interleaved:  # features ordered (block, channel)
        return moved.reshape(block, channels, moved.shape[1], -1).swapaxes(0, 1)
    return moved.reshape(channels, block, moved.shape[1], -1)


def from_consumer_view(view: np.ndarray, like: np.ndarray, layer: Layer, interleaved: bool = False) -> np.ndarray:
    moved_shape = np.moveaxis(like, layer.in_axis, 0).shape
    if interleaved:
        view = view.swapaxes(0, 1)
    moved = view.reshape((view.shape[0] * view.shape[1],) + moved_shape[1:])
    return np.moveaxis(moved, 0, layer.in_axis)


def add_consumer_bias(index: GraphIndex, layer: Layer, delta: np.ndarray) -> str:
    node = layer.node
    if node.op_type == "MatMul":
        if layer.bias is None:
            return "offset dropped: MatMul consumer has no bias Add"
        name, scale = layer.bias, 1.0
    elif len(node.input) > 2 and node.input[2]:
        name, scale = node.input[2], float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    else:
        name, scale = index.attach_bias(node, np.zeros(len(delta), dtype=index.array(layer.weight).dtype)), 1.0
    old = index.array(name)
    full = np.broadcast_to(old.reshape(-1) if old.size in (1, len(delta)) else old, (len(delta),))
    index.set_array(name, (full + delta / scale).reshape(old.shape if old.size == len(delta) else (len(delta),)))
    return ""


def compensate(index: GraphIndex, chain: Chain, comp: Compensation) -> str:
    """The same compensation on every consumer (a fan-out's readers all see the same channels)."""
    notes = []
    for b in branches_of(chain):
        c = b.consumer
        new, bias = compensate_along(index.array(c.weight), c.in_axis, c.out_axis, comp, b.block, b.interleaved)
        index.set_array(c.weight, new)
        notes.append(add_consumer_bias(index, c, bias) if bias is not None else "")
    return "; ".join(dict.fromkeys(n for n in notes if n))


def shrink_reshape(index: GraphIndex, node: onnx.NodeProto, channels: int, kept_count: int) -> None:
    """A flattening Reshape that spells out its feature count: channels blocks become kept_count."""
    shape = index.array(node.input[1]).copy()
    if shape[1] <= 0 or shape[1] % channels:
        return  # -1 (inferred) or not a channel-major count: nothing spelled out to fix
    shape[1] = shape[1] // channels * kept_count
    if index.shared_with(node.input[1], node):  # another Reshape uses the same constant
        name = index.unique_name(node.input[1] + "_pruned")
        index.add_initializer(name, shape)
        node.input[1] = name
    else:
        index.set_array(node.input[1], shape)


def fix_shapes(index: GraphIndex, chain: Chain, kept_count: int) -> None:
    """Constants on the path that spell out the channel count, and stale value_info."""
    for node in chain.path:
        if node.op_type == "Reshape":
            shrink_reshape(index, node, chain.channels, kept_count)
        if node.op_type in ("Resize", "Upsample") and len(node.input) > 3 and index.is_weight(node.input[3]):
            sizes = index.array(node.input[3]).copy()
            if sizes.size > 1:
                sizes[1] = kept_count
                index.set_array(node.input[3], sizes)
    drop_value_info(index.model, set(chain.tensors))


def describe(chain: Chain, comp: Compensation, method: str) -> dict:
    cos = comp.notes.get("cosine")
    regressed = 0 if comp.dense is None else int(np.count_nonzero(np.any(comp.dense != 0, axis=0)))
    entry = {"layer": chain.name, "op": chain.producer.node.op_type,
             "consumer": ", ".join(b.consumer.name for b in branches_of(chain)),
             "channels": chain.channels, "kept": len(comp.kept), "merged": int(len(comp.merged)),
             "regressed": regressed, "pruned": int(len(comp.removed) - len(comp.merged) - regressed),
             "method": comp.notes.get("method", method), "mean_cosine": None if cos is None or not len(cos) else round(float(np.mean(cos)), 4)}
    if "predicted_error" in comp.notes:  # under the data-free model, relative to what the layer feeds its consumer
        entry["predicted_error"] = round(float(comp.notes["predicted_error"]), 4)
    if "fallback" in comp.notes:
        entry["note"] = comp.notes["fallback"]
    return entry


class MergeChannels:
    name = "merge-channels"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        opts = ctx.options
        index = GraphIndex(model)
        chains, skips = find_chains(index)
        for skip in skips:
            ctx.skip(skip.node, skip.reason)
        layers = ctx.report.setdefault("layers", [])
        # The criterion ranks every layer on its weights as trained. Partners and scales are
        # then computed layer by layer on the weights as already compensated by the layer
        # before (they describe the network that will run), or, with independent_layers,
        # all from the original weights as the paper does; calibration re-plans layer by
        # layer itself, so there the plans are only its fallback.
        calibrating = getattr(opts, "calibration", None) is not None
        sequential = not (opts.independent_layers or calibrating)
        plans, waiting = [], []
        for chain in chains:
            ratio = opts.ratio_for(chain.match_names())
            if ratio is None:
                ctx.skip(chain.name, "excluded by --exclude")
                continue
            n_keep = opts.kept_channels(chain.channels, ratio, chain.producer.node.op_type)
            if n_keep >= chain.channels:
                why = opts.kept_whole_by_alignment(chain.channels, ratio, chain.producer.node.op_type)
                if why:
                    ctx.skip(chain.name, f"left whole: {why}")
                continue
            method = opts.method
            # regress models any activation it can name; merging needs a homogeneous one
            if method != "prune" and not chain.mergeable and not (method == "regress" and chain_activation(index, chain)):
                log.info("%s: %s", chain.name, chain.why_not_merge)
                method = "prune"
            plan_opts = opts.plan_options(method, bn_hidden=chain.bn is None and chain.producer.node.op_type == "Conv",
                                          dense=is_dense(chain), channels=chain.channels)
            arrays = self._arrays(index, chain, plan_opts, ranking=True)
            if sequential:
                kept = rank_kept(arrays, n_keep, plan_opts) if ranks_by_criterion(arrays, plan_opts) else None
                waiting.append((chain, plan_opts, n_keep, kept))
            else:
                plans.append((chain, plan_opts, plan_layer(arrays, n_keep, plan_opts)))
        if calibrating:
            # The calibration pass selects and rewrites layer by layer (a fan-out's consumers
            # together); these plans are its fallback.
            ctx.original = model.SerializeToString()
            ctx.plans = plans
            return False
        rewrites = waiting or plans
        if ctx.progress is not None:
            rewrites = ctx.progress(rewrites, desc="rewriting", unit="layer")
        if sequential:
            for chain, plan_opts, n_keep, kept in rewrites:
                comp = plan_layer(self._arrays(index, chain, plan_opts, ranking=False), n_keep, plan_opts, kept)
                plans.append((chain, plan_opts, comp))
                layers.append(apply_plan(index, chain, comp, plan_opts))
        else:
            for chain, plan_opts, comp in rewrites:
                layers.append(apply_plan(index, chain, comp, plan_opts))
        ctx.plans = plans
        return bool(plans)

    @staticmethod
    def _arrays(index: GraphIndex, chain: Chain, plan_opts: PlanOptions, ranking: bool) -> ProducerArrays:
        # l2-path ranks by the consumer's column norms (a re-plan with the ranking given does not);
        # regress reads the consumer's rows where it models the layer's activations
        norms = ranking and plan_opts.criterion == "l2-path"
        arrays = producer_arrays(index, chain, consumer_norms=norms)
        if plan_opts.method == "regress" and models_activations(arrays):
            arrays = producer_arrays(index, chain, consumer_norms=norms, consumer_rows=True)
        return arrays


def apply_plan(index: GraphIndex, chain: Chain, comp: Compensation, plan_opts: PlanOptions) -> dict:
    """Shrink the producer, compensate the consumer, fix shapes; returns the report entry."""
    shrink_producer(index, chain, comp.kept)
    note = compensate(index, chain, comp)
    fix_shapes(index, chain, len(comp.kept))
    entry = describe(chain, comp, plan_opts.method)
    if entry["method"] != "regress":  # regress selects by its own elimination, not the criterion
        entry["criterion"] = plan_opts.criterion
    if entry["merged"]:
        entry["scale_rule"] = plan_opts.scale_rule
    if note or chain.why_not_merge:
        entry["note"] = "; ".join(x for x in (chain.why_not_merge, note) if x)
    log.info("%s -> %s: %d -> %d channels (%d merged, %d pruned)", chain.name, entry["consumer"],
             chain.channels, entry["kept"], entry["merged"], entry["pruned"])
    return entry
