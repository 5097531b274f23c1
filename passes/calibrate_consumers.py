"""Choose kept channels and refit each consumer on calibration data.

    original:   ... -> x (N channels)  -> C(W, b) -> y
    compressed: ... -> x' (P channels) -> C(W', b') -> y'      kept, W', b' = argmin ||y' - y||^2 (+ ridge)

Chains are handled in graph order, each on activations of the model as already compressed,
so later layers correct what earlier ones left. A chain's producer whose input an earlier chain
moved is first refitted to its own original output on that input (sequential reconstruction:
on the paper's ResNet-56 it lifted 0.5 from 88.79 to 89.48 % on the exact test images, and 76.75
to 77.49 % on the 10,000 JPEG ones). Each run over the calibration set starts from the tensors
an earlier run left that no rewrite has moved since (``ActivationCache``). A consumer whose output (or its BN's) is added
to a residual stream is fitted to the original sum minus the compressed stream, so it also
cancels the drift that earlier blocks left there. The kept channels come from greedy backward
elimination on the consumer's least-squares problem (``select_channels``). The result is used
only where it beats the data-free plan on the same statistics; an ill-conditioned or
unsupported layer falls back to the data-free plan with a note. A fully connected chain is
then refined as a block, producer and consumer together (``math/refine.py``), where that
lowers the error on held-out calibration rows. A consumer that its samples give too few rows
(a fully connected layer: one per sample) is also fitted on mixed samples
(``onnx_merge/calibration.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from onnx_merge.calibration import ActivationCache, CalibrationSet, Taps
from onnx_merge.graph import GraphIndex, attr
from onnx_merge.groups import Chain, Layer, activation_kind, describe_layer
from onnx_merge.math import Compensation, compensate_consumer
from onnx_merge.math.calibrate import (LeastSquaresFit, im2col, objective, patch_count, refit, same_pads,
                                       select_channels, select_channels_jointly)
from onnx_merge.ops import PER_CHANNEL, conv_groups, rule
from onnx_merge.math.activations import FUNCTIONS, activation
from onnx_merge.math.refine import DenseBlock, refine_block
from onnx_merge.runtime import graph_inputs, match_inputs

from .merge_channels import (activation_slope, add_consumer_bias, apply_plan, branches_of, consumer_view, current_bias,
                             describe, from_consumer_view)
from .prune_coupled import GroupPlan, plan_groups, prune_group

log = logging.getLogger("onnx_merge.calibrate")
MAX_FEATURES = 8192  # the F x F Gram matrix of a wider consumer would not fit comfortably
MAX_REFINE_WORK = 5e8  # rows x parameters of one block refinement: bounds its time and the rows it holds
# A smooth activation (GELU's erf, SiLU's sigmoid) and its central-difference derivative cost
# this many times a ReLU's rows (measured: 16,384 rows of a 64-64-64 block, 106 s with GELU,
# 24 s with ReLU on the shared 2-core machine).
SMOOTH_ACTIVATION_COST = 4
MIN_REFINE_ROWS = 256  # fewer rows than this cannot hold a quarter out and still fit a block
MAX_REFINE_ROWS = 16384
# A convolution's patch rows per batch beyond calibration_rows are taken only while the consumer
# has fewer than this many rows per feature over the whole set: the paper's ResNet-56 at 0.5 kept
# 89.48 % with 4,096 rows a batch as with 16,384, in two thirds of the time (the Gram matrices'
# rank-k updates are most of it).
ROWS_PER_FEATURE = 64
# A consumer whose samples give fewer rows than this per feature is also fitted on mixed samples
# (onnx_merge/calibration.py): a Gemm reading one row per sample, a transformer's FFN (its tokens
# count as one row: on the FashionMNIST ViT, validation images 50,000-59,999, ratio 0.3 / 0.5,
# top-1 87.15 / 86.46 without mixed samples, 87.06 / 86.81 with 3 per sample; original 87.35). A convolution's patches give
# hundreds of rows per sample; there mixed images only cost time (measured on ResNet-56), and a
# wide one (ImageNet's 512 x 3 x 3) whose rows already cost MIXED_WORK does without.
MIXED_BELOW_ROWS_PER_FEATURE = 10
MIXED_WORK = 2 ** 36  # rows x features^2 of a consumer's Gram matrix past which no mixed samples are added
STORE_BYTES = 1 << 30  # original-model rows held at once for the coming consumers
CACHE_BYTES = 1 << 29  # compressed-model tensors held for later runs to start from (calibration.ActivationCache)


def residual_operand(index: GraphIndex, layer: Layer) -> tuple[str, np.ndarray | None] | None:
    """The other operand of the Add that the consumer's output alone feeds (directly or through
    a BatchNormalization, whose per-channel scale is returned too), when that operand is computed.

    Fitting the consumer to (original sum - compressed operand) instead of its own original
    output lets it also cancel the error that earlier layers left in the residual stream.
    """
    out, scale = layer.output or layer.node.output[0], None  # after a MatMul's bias Add
    add = index.sole_reader(out)
    if isinstance(add, onnx.NodeProto) and add.op_type == "BatchNormalization" and all(
            index.is_weight(n) for n in add.input[1:5]):
        scale = index.batchnorm(add).multiplier
        out = add.output[0]
        add = index.sole_reader(out)
        if np.any(np.abs(scale) < 1e-12):
            return None
    if not isinstance(add, onnx.NodeProto) or add.op_type != "Add" or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    return None if index.is_weight(other) else (other, scale)


def _output_rows(layer: Layer, y: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """A consumer-shaped output (B, M, ...) as rows in the order of _features (``rows``: only those)."""
    if layer.node.op_type != "Conv":
        flat = y.reshape(-1, y.shape[-1])
        return flat if rows is None else flat[rows]
    if rows is None:
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    where = np.unravel_index(rows, (y.shape[0],) + y.shape[2:])
    return y[(where[0], slice(None)) + where[1:]]


def _row_count(layer: Layer, y: np.ndarray) -> int:
    """Rows a consumer-shaped output gives: batch x positions for a Conv, batch x tokens otherwise."""
    return y.size // (y.shape[1] if layer.node.op_type == "Conv" else y.shape[-1])


def _features(layer: Layer, x: np.ndarray, weight_shape, rows: np.ndarray | None, expected: int) -> np.ndarray | None:
    """Consumer inputs as rows of features in the weight's (channel, taps) order: ``rows`` of
    them (all with None), or None where the input does not give ``expected`` rows."""
    node = layer.node
    if node.op_type == "Conv":
        d = len(weight_shape) - 2
        if x.ndim != d + 2:
            return None
        kernel, strides, dilations = list(weight_shape[2:]), attr(node, "strides", [1] * d), attr(node, "dilations", [1] * d)
        auto_pad = attr(node, "auto_pad", "NOTSET")
        pads = (attr(node, "pads", [0] * 2 * d) if auto_pad == "NOTSET" else
                same_pads(x.shape[2:], kernel, strides, dilations, auto_pad))
        if len(x) * patch_count(x.shape[2:], kernel, strides, pads, dilations) != expected:
            return None
        return im2col(x, kernel, strides, pads, dilations, rows)
    if node.op_type in ("Gemm", "MatMul"):
        flat = x.reshape(-1, x.shape[-1])
        return None if len(flat) != expected else flat if rows is None else flat[rows]
    return None


def _matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """Weights as (outputs, features) in the order of _features."""
    if layer.node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if layer.in_axis == 1 else w.T


def _from_matrix(layer: Layer, m: np.ndarray, like_shape) -> np.ndarray:
    if layer.node.op_type == "Conv":
        return m.reshape((m.shape[0], -1) + tuple(like_shape[2:]))
    return m if layer.in_axis == 1 else m.T


def _bias(index: GraphIndex, layer: Layer, outputs: int) -> np.ndarray:
    """The layer's bias values as (outputs,), Gemm beta applied; zeros when it has none."""
    name = current_bias(layer)
    if name is None:
        return np.zeros(outputs)
    return np.broadcast_to(index.array(name).reshape(-1).astype(np.float64), (outputs,)) * layer.beta


def _set_layer(index: GraphIndex, layer: Layer, w: np.ndarray, b: np.ndarray) -> None:
    """Write a layer's (outputs, features) weights and (outputs,) bias, as computed (alpha and
    beta applied), into its initializers."""
    current = index.array(layer.weight)
    b_cur = _bias(index, layer, len(w))
    index.set_array(layer.weight, _from_matrix(layer, w / layer.alpha, current.shape).astype(current.dtype))
    add_consumer_bias(index, layer, b - b_cur)


def _data_free_objective(fit: LeastSquaresFit, index: GraphIndex, chain: Chain, reader, comp: Compensation) -> float:
    """Error of the data-free plan for one reader of the chain on the same statistics, in the
    full feature space."""
    c = reader.layer
    weight = index.array(c.weight)
    new_view, delta = compensate_consumer(consumer_view(weight, c, chain.channels, reader.block, reader.interleaved), comp)
    # read back channel-major, the order the fit uses
    w_kept = _matrix(c, from_consumer_view(new_view, weight, c)).astype(np.float64) * c.alpha
    b = _bias(index, c, w_kept.shape[0]) + (0.0 if delta is None else delta)
    return objective(fit, _embed(w_kept, comp.kept, chain.channels), b)


def channel_major(channels: int, block: int) -> np.ndarray:
    """Feature positions in channel-major order for an interleaved layout (channel c owns
    features c, c + channels, ...): the fit groups each channel's features contiguously."""
    return (np.arange(block)[None, :] * channels + np.arange(channels)[:, None]).ravel()


def _embed(w: np.ndarray, kept: np.ndarray, channels: int) -> np.ndarray:
    """Weights on the kept channels placed in the full (M, channels * g) feature space."""
    g = w.shape[1] // len(kept)
    full = np.zeros((w.shape[0], channels * g))
    full[:, (kept[:, None] * g + np.arange(g)).ravel()] = w
    return full


def refinable(index: GraphIndex, chain: Chain):
    """The activation where the chain is a block ``refine_block`` models: Gemm/MatMul -> one
    activation -> Gemm/MatMul, each layer able to carry a bias: a ReLU-like one's negative
    slope (float), any other named one's function (GELU, SiLU, ...); None otherwise."""
    if chain.bn is not None or chain.block != 1 or len(branches_of(chain)) != 1:
        return None
    for layer in (chain.producer, chain.consumer):
        op = layer.node.op_type
        if op not in ("Gemm", "MatMul") or (op == "Gemm" and attr(layer.node, "transA", 0)) or (
                op == "MatMul" and layer.bias is None):
            return None
    if len(chain.path) == 1 and chain.mergeable and activation_kind(index, chain.path[0]) == "homogeneous":
        return activation_slope(index, chain)
    named = chain.activation
    if named is None or named[0] not in FUNCTIONS:
        return None
    return activation(*named)


def refine_parameters(index: GraphIndex, chain: Chain, kept: int) -> int:
    """Parameters of the block once the producer keeps ``kept`` channels."""
    p, c = chain.producer, chain.consumer
    features = index.initializers[p.weight].dims[p.in_axis]
    outputs = index.initializers[c.weight].dims[c.out_axis]
    return kept * (features + 1) + outputs * (kept + 1)


def refine(index: GraphIndex, chain: Chain, slope: float, rows: tuple[np.ndarray, np.ndarray],
           iterations: int) -> tuple[bool, str]:
    """Refine the chain's producer and consumer together on ``rows``, written back only where
    that lowers the held-out error: whether it was, and what happened, for the report."""
    p, c = chain.producer, chain.consumer
    w1 = _matrix(p, index.array(p.weight).astype(np.float64)) * p.alpha
    w2 = _matrix(c, index.array(c.weight).astype(np.float64)) * c.alpha
    start = DenseBlock(w1, _bias(index, p, len(w1)), w2, _bias(index, c, len(w2)),
                       **({"slope": slope} if isinstance(slope, float) else {"fn": slope}))
    x, target = rows
    if x.shape[1] != w1.shape[1] or target.shape[1] != w2.shape[0] or len(x) != len(target):
        return False, "not refined: the rows do not match the layers"
    if len(x) < MIN_REFINE_ROWS:
        return False, f"not refined: {len(x)} calibration rows (refinement needs {MIN_REFINE_ROWS})"
    done = refine_block(start, x, target, iterations)
    if done is None:
        return False, f"not refined: no refinement lowered the error on held-out rows ({len(x)} rows)"
    block, info = done
    _set_layer(index, p, block.w1, block.b1)
    _set_layer(index, c, block.w2, block.b2)
    before, after = info["held_out_error"]
    return True, (f"producer and consumer refined together on {len(x)} rows (strength {info['strength']:g}): "
                  f"held-out error {before:.3g} -> {after:.3g}")


@dataclass
class Problem:
    """What the original model gives one consumer's least-squares problem: the consumer there,
    the tensor that is its target (its output, bias included), and the residual operand
    (tensor, BN scale) its output is added to, if any."""

    layer: Layer
    weight_shape: tuple
    target: str
    residual: tuple[str, np.ndarray | None] | None
    features: int
    outputs: int
    # False for a drifted producer's refit: mixed samples would cost a run of everything before it
    # per copy (3 on ResNet-18's layer4.0 took 40 of 200 s) for a fit that only tidies the drift
    mixable: bool = True

    @property
    def taps(self) -> list[str]:
        return [self.target] + ([self.residual[0]] if self.residual else [])

    def wants_mixed(self, rows: int, samples: int) -> bool:
        """Whether ``rows`` of ``samples`` are too few for the fit, and mixed rows affordable. A
        fully connected layer's rows from one sample (its tokens) count as one: they are far
        from independent (a ViT's 17 tokens per image overfit its FFN refits like 1)."""
        independent = rows if self.layer.node.op_type == "Conv" else samples
        return self.mixable and independent < MIXED_BELOW_ROWS_PER_FEATURE * self.features and rows * self.features ** 2 <= MIXED_WORK



@dataclass
class Captured:
    """One consumer's rows from the original model, batch by batch, on the samples and on the
    mixed samples: (rows available, which were taken (None: all), targets, residual operand)."""

    real: list = field(default_factory=list)
    mixed: list = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(len(t) for _, _, t, _ in self.real + self.mixed)

    def nbytes(self) -> int:
        return sum(t.nbytes + (0 if s is None else s.nbytes) for _, _, t, s in self.real + self.mixed)


def problem_for(orig_index: GraphIndex, orig_nodes: dict, layer: Layer) -> Problem | None:
    """The consumer's problem, or None where it cannot be calibrated (a ConvTranspose reads its
    weight transposed; a grouped conv; a consumer over MAX_FEATURES features)."""
    node = orig_nodes.get(layer.node.name)
    if node is None or node.op_type not in ("Conv", "Gemm", "MatMul") or conv_groups(node) != 1:
        return None
    layer = describe_layer(orig_index, node)
    shape = tuple(orig_index.initializers[layer.weight].dims)
    features = int(np.prod(shape[1:])) if node.op_type == "Conv" else shape[layer.in_axis]
    if features > MAX_FEATURES:
        return None
    return Problem(layer, shape, layer.output, residual_operand(orig_index, layer), features, shape[layer.out_axis])


class OriginalTargets:
    """The original model's rows for the coming consumers, read in one onnxruntime run for as
    many of them as STORE_BYTES holds (the first batch, read for all, sizes them)."""

    def __init__(self, model: onnx.ModelProto, problems: list[Problem | None], calib: CalibrationSet, opts):
        self.model, self.problems, self.calib, self.opts = model, problems, calib, opts
        self.captured: dict[int, Captured] = {}
        self.runs = 0

    def take(self, k: int) -> Captured:
        if k not in self.captured:
            self._capture(k)
        return self.captured.pop(k)

    def _capture(self, k: int) -> None:
        pending = [j for j in range(k, len(self.problems)) if self.problems[j] is not None]
        batches = self.calib.batches()
        first = next(batches)
        taps = Taps(self.model, [t for j in pending for t in self.problems[j].taps])
        out = taps.run(first)
        self.runs += 1
        window, held, n_batches = [], 0, -(-self.calib.samples // self.calib.batch)
        for j in pending:
            self.captured[j] = Captured()
            self._keep(j, out, 0, self.captured[j].real)
            got = self.captured[j]
            mixed = self.calib.mixed if self.problems[j].wants_mixed(got.rows * n_batches, self.calib.samples) else 0
            estimate = got.nbytes() * n_batches * (1 + mixed / self.calib.samples)
            if window and held + estimate > STORE_BYTES:
                del self.captured[j]
                break
            window.append(j)
            held += estimate
        if len(window) < len(pending):
            taps = Taps(self.model, [t for j in window for t in self.problems[j].taps])
        for b, part in enumerate(batches, 1):
            out = taps.run(part)
            for j in window:
                self._keep(j, out, b, self.captured[j].real)
        mixing = [j for j in window if self.problems[j].wants_mixed(self.captured[j].rows, self.calib.samples)]
        if mixing and self.calib.mixed:
            taps = Taps(self.model, [t for j in mixing for t in self.problems[j].taps])
            for b, part in enumerate(self.calib.mixed_batches()):
                out = taps.run(part)
                for j in mixing:
                    self._keep(j, out, b, self.captured[j].mixed, mixed=True)

    def _keep(self, j: int, out: dict, batch: int, into: list, mixed: bool = False) -> None:
        problem = self.problems[j]
        y = out[problem.target]
        count = _row_count(problem.layer, y)
        # calibration_rows is per batch of calibration_batch samples: a fixed-batch export runs in
        # smaller batches, which get their share (a batch-1 dla34 took 4,096 rows from every sample)
        share = min(1.0, self.calib.batch / max(self.opts.calibration_batch, 1))
        cap = max(math.ceil(self.opts.calibration_rows * share), -(-ROWS_PER_FEATURE * problem.features //
                                                                     self.calib.batch_count))
        rows = None
        if count > cap:  # a fixed random subset, the same in the compressed model's run
            rows = np.sort(np.random.default_rng([j, batch, int(mixed)]).choice(count, cap, replace=False))
        skip = None
        if problem.residual is not None and out[problem.residual[0]].shape == y.shape:  # a broadcast operand is left
            skip = _output_rows(problem.layer, out[problem.residual[0]], rows)
        into.append((count, rows, _output_rows(problem.layer, y, rows).astype(np.float32), skip))


@dataclass
class Reader:
    """One consumer of a unit's channels: the layer in the model being compressed, how it
    sees the channels, its problem in the original model (None: it cannot be calibrated),
    and whether it is a gate's reduce layer (refitted on the kept channels, but not asked
    which to keep: its output only scales the channels that the other readers see)."""

    layer: Layer
    block: int = 1
    interleaved: bool = False
    problem: Problem | None = None
    gate: bool = False
    slot: int = -1  # its place in the list of problems OriginalTargets captures for


@dataclass
class Unit:
    """What calibration compresses at once: a free chain (one or several consumers, its
    data-free plan the fallback) or a coupled group (depthwise convs, SE gates, residual
    streams under --coupled prune; the weight criterion's pruning the fallback)."""

    name: str
    channels: int
    n_keep: int
    kept: np.ndarray  # the fallback's kept channels
    readers: list[Reader]
    producers: list[Layer]  # layers whose output channels go
    chain: tuple | None = None  # (chain, plan options, data-free Compensation)
    group: GroupPlan | None = None
    why_not: str = ""  # why the unit is not calibrated (its fallback is applied)
    refits: list[Reader] = field(default_factory=list)  # producers whose input drifted: refitted first

    @property
    def inputs(self) -> list[str]:
        """What the producers read: the unit's own rewrite leaves these valid for later runs."""
        return [p.node.input[0] for p in self.producers]

    def fallback(self, index: GraphIndex, opts) -> dict:
        if self.chain is not None:
            return apply_plan(index, *self.chain)
        return self.group.apply(index, opts)

    def prune(self, index: GraphIndex, kept: np.ndarray) -> None:
        """Remove the channels outside ``kept`` everywhere, consumers' columns included."""
        if self.chain is not None:
            chain, plan_opts, _ = self.chain
            apply_plan(index, chain, Compensation.prune(self.channels, kept), plan_opts)
        else:
            prune_group(index, self.group.group, kept, self.channels, self.group.views)

    def entry(self, kept: np.ndarray) -> dict:
        if self.chain is not None:
            return describe(self.chain[0], Compensation.prune(self.channels, kept), "calibrated")
        return self.group.entry(len(kept), f"calibrated ({self.group.group.kind} group)")


def _walk_per_channel(index: GraphIndex, tensor: str):
    """The node that first reads ``tensor`` past a run of sole-reader per-channel ops (None
    where the tensor is read by several nodes)."""
    for _ in range(64):
        node = index.sole_reader(tensor)
        if not isinstance(node, onnx.NodeProto) or rule(node.op_type).kind != PER_CHANNEL or len(node.output) != 1:
            return node
        tensor = node.output[0]
    return None


def gate_readers(index: GraphIndex, group) -> set[str]:
    """Consumers of the group whose output drives a gate of the same group (an SE block's
    reduce conv: pool -> reduce -> act -> expand -> HardSigmoid -> Mul with the channels)."""
    gate_producers = set()
    for p in group.producers:
        reader = _walk_per_channel(index, p.output)
        if isinstance(reader, onnx.NodeProto) and reader.op_type == "Mul":
            gate_producers.add(p.node.name)
    gates = set()
    for c in group.consumers:
        reader = _walk_per_channel(index, c.output)
        if isinstance(reader, onnx.NodeProto) and reader.name in gate_producers:
            gates.add(c.node.name)
    return gates


def group_unit(index: GraphIndex, plan: GroupPlan) -> Unit:
    group, n = plan.group, plan.channels
    unit = Unit(" + ".join(plan.names), n, plan.n_keep, plan.kept, [], list(group.producers), group=plan)
    if group.blocks > 1 or any(conv_groups(c.node) > 1 for c in group.consumers):
        unit.why_not = "a grouped conv reads it"
    gates = gate_readers(index, group)
    for c in group.consumers:
        block = int(index.initializers[c.weight].dims[c.in_axis]) // n
        unit.readers.append(Reader(c, block, False, gate=c.node.name in gates))
    if unit.readers and all(r.gate for r in unit.readers):
        unit.why_not = unit.why_not or "only gates read it"
    return unit


def chain_unit(chain: Chain, plan_opts, comp: Compensation) -> Unit:
    readers = [Reader(b.consumer, b.block, b.interleaved) for b in branches_of(chain)]
    return Unit(chain.name, chain.channels, len(comp.kept), comp.kept, readers, [chain.producer],
                chain=(chain, plan_opts, comp))


def _node_positions(model: onnx.ModelProto) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(model.graph.node)}


class _Recorder:
    """Skips go nowhere: prune-coupled, which runs after, records them."""

    def skip(self, node: str, reason: str) -> None:
        pass


class CalibrateConsumers:
    name = "calibrate-consumers"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        opts = ctx.options
        if opts.calibration is None or ctx.original is None:
            return False
        index = GraphIndex(model)
        units = [chain_unit(*p) for p in ctx.plans]
        for plan in plan_groups(index, opts, _Recorder()):
            g = plan.group
            if not (g.views or g.splits or g.parts or g.split_of or g.driven):  # index maps: prune-coupled, sized as it goes
                units.append(group_unit(index, plan))
        if not units:
            return False
        # in the order of each unit's last reader: a layer is refitted once what feeds it is final
        at = _node_positions(model)
        units.sort(key=lambda u: max((at.get(r.layer.node.name, -1) for r in u.readers), default=-1))
        original = onnx.load_from_string(ctx.original)
        orig_index = GraphIndex(original)
        orig_nodes = {n.name: n for n in original.graph.node}
        feeds = match_inputs(graph_inputs(original), opts.calibration, "--calibration")
        total, batch = len(next(iter(feeds.values()))), opts.calibration_batch
        first = original.graph.input[0].type.tensor_type.shape.dim
        fixed = first[0].dim_value if len(first) and first[0].HasField("dim_value") else None
        if isinstance(fixed, int) and fixed > 0:  # a fixed batch dimension: whole chunks of it only
            batch, total = fixed, total - total % fixed
        calib = CalibrationSet({k: v[:total] for k, v in feeds.items()}, batch, opts.calibration_mixup,
                               cache=ActivationCache(CACHE_BYTES))
        ctx.report["calibration"] = {"samples": calib.samples, "mixed": calib.mixed}
        if opts.calibration_mixup and not calib.mixed:
            log.info("calibration inputs are not all floating point: no mixed samples, %d samples alone", calib.samples)
        problems = []
        for unit in units:
            unit.refits = [Reader(p, problem=problem) for p in drifted_producers(index, unit, units)
                           if (problem := problem_for(orig_index, orig_nodes, p)) is not None]
            for r in unit.refits:
                r.problem = replace(r.problem, residual=None, mixable=False)  # its own output is the target
                r.slot = len(problems)
                problems.append(r.problem)
            for r in unit.readers:
                r.problem = None if unit.why_not else problem_for(orig_index, orig_nodes, r.layer)
                r.slot = len(problems)
                problems.append(r.problem)
        targets = OriginalTargets(original, problems, calib, opts)
        layers = ctx.report.setdefault("layers", [])
        steps = units if ctx.progress is None else ctx.progress(units, desc="calibrating", unit="group")
        started = time.perf_counter()
        out_kept: dict[str, np.ndarray] = {}  # layer -> which of its original outputs it still writes
        for unit in steps:
            if hasattr(steps, "set_postfix_str"):
                steps.set_postfix_str(unit.name, refresh=True)
            began = time.perf_counter()
            index = GraphIndex(model)
            refitted = [refit_producer(index, r, targets.take(r.slot), calib, opts.calibration_ridge, out_kept)
                        for r in unit.refits]
            captured = [targets.take(r.slot) if r.problem is not None else None for r in unit.readers]
            if unit.chain is not None and len(unit.readers) == 1:
                entry, kept = self._calibrate(index, unit, captured[0], calib, opts, out_kept)
            else:
                entry, kept = self._calibrate_jointly(index, unit, captured, calib, opts, out_kept)
            if refitted:
                entry["producers_refitted"] = [r for r in refitted if r is not None]
            for p in unit.producers:
                out_kept[p.node.name] = out_kept.get(p.node.name, np.arange(unit.channels))[kept]
            if unit.group is not None:
                ctx.groups_done.add(unit.group.names[0])
            entry["seconds"] = round(time.perf_counter() - began, 2)
            error = entry.get("error")
            producers = "".join(f"; producer {r['layer']} refitted first, relative error {r['error']['before']:.4g} -> "
                                f"{r['error']['after']:.4g}" for r in entry.get("producers_refitted", []))
            log.info("%s: %s%s%s, %.1f s", unit.name, entry["calibration"],
                     "" if error is None else f"; relative error {error['data_free']:.4g} (data-free) -> "
                     f"{error['calibrated']:.4g} (refit)", producers, entry["seconds"])
            layers.append(entry)
        ctx.report["calibration"].update(seconds=round(time.perf_counter() - started, 2),
                                         original_runs=targets.runs, runs_from_cached=calib.cache.started_from)
        return True

    def _calibrate(self, index: GraphIndex, unit: Unit, captured: Captured | None, calib: CalibrationSet, opts,
                   out_kept: dict) -> tuple[dict, np.ndarray]:
        """Calibrate a chain with one consumer: choose the kept channels and refit the consumer
        where that beats the data-free plan on the calibration data; the report entry and the
        channels kept."""
        chain, plan_opts, comp = unit.chain
        reader = unit.readers[0]
        slope = refinable(index, chain) if opts.refine_iterations else None
        # rows kept for refinement: the budget bounds its time and memory
        work = MAX_REFINE_WORK / (1 if isinstance(slope, float) else SMOOTH_ACTIVATION_COST)
        cap = 0 if slope is None else int(min(MAX_REFINE_ROWS,
                                              work // refine_parameters(index, chain, len(comp.kept))))
        fits, rows = ([None], None) if reader.problem is None else _collect(
            index, [reader], [captured], calib, chain.channels, out_kept,
            keep_rows=cap if cap >= MIN_REFINE_ROWS else 0, producer_input=chain.producer.node.input[0],
            keep=unit.inputs)
        fit = fits[0]
        if fit is None:
            entry = apply_plan(index, chain, comp, plan_opts)
            entry["calibration"] = "fell back to the data-free plan (too wide or unsupported layout)"
            return entry, comp.kept
        candidates = []  # (error on the calibration data, kept, W', b') -- lowest wins
        chosen = select_channels(fit, chain.channels, len(comp.kept), ridge=opts.calibration_ridge)
        if chosen is not None:
            for kept in (chosen[0], comp.kept):
                w_new, b_new = refit(fit, kept, chain.channels, opts.calibration_ridge)
                candidates.append((objective(fit, _embed(w_new, kept, chain.channels), b_new), kept, w_new, b_new))
        best = min(candidates, key=lambda c: c[0]) if candidates else None
        data_free = _data_free_objective(fit, index, chain, reader, comp)
        error = {"data_free": (data_free + fit.energy) / max(fit.energy, 1e-30)}
        if best is None or best[0] >= data_free:
            entry = apply_plan(index, chain, comp, plan_opts)
            entry["calibration"] = ("fell back to the data-free plan (ill-conditioned)" if best is None else
                                    "kept the data-free plan (lower error on the calibration data)")
            error["calibrated"] = error["data_free"] if best is None else (best[0] + fit.energy) / max(fit.energy, 1e-30)
            kept = comp.kept
        else:
            _, kept, w_new, b_new = best
            unit.prune(index, kept)
            _write(index, reader, len(kept), w_new, b_new)
            entry = unit.entry(kept)
            how = "selected on the calibration data" if kept is not comp.kept else "the criterion's selection"
            entry["calibration"] = f"{how}, consumer refitted on {fit.rows} rows"
            entry["refitted"] = [reader.layer.name]
            error["calibrated"] = (best[0] + fit.energy) / max(fit.energy, 1e-30)
        entry["rows"] = fit.rows
        entry["error"] = {k: float(f"{v:.6g}") for k, v in error.items()}
        if rows is not None:
            refined, entry["refinement"] = refine(index, chain, slope, rows, opts.refine_iterations)
            if refined:
                entry["method"] += " + refined"
        elif slope is not None:
            entry["refinement"] = (f"not refined: {refine_parameters(index, chain, len(comp.kept))} parameters "
                                   "are too many for the refinement budget")
        return entry, kept

    def _calibrate_jointly(self, index: GraphIndex, unit: Unit, captured: list, calib: CalibrationSet, opts,
                           out_kept: dict) -> tuple[dict, np.ndarray]:
        """Calibrate a unit with several readers (a fan-out, a depthwise block with its SE gate, a
        residual stream): the kept channels chosen on every reader's problem together (relative
        errors summed; gate readers left out), each reader refitted; the fallback where it wins."""
        n, ridge = unit.channels, opts.calibration_ridge

        def fallback(why: str) -> tuple[dict, np.ndarray]:
            entry = unit.fallback(index, opts)
            entry["calibration"] = why
            return entry, unit.kept

        if unit.why_not:
            return fallback(f"not calibrated ({unit.why_not}): the data-free plan")
        if any(r.problem is None for r in unit.readers):
            return fallback("fell back to the data-free plan (a reader is too wide or of an unsupported layout)")
        fits, _ = _collect(index, unit.readers, captured, calib, n, out_kept, keep=unit.inputs)
        if any(f is None for f in fits):
            return fallback("fell back to the data-free plan (unsupported layout)")
        choosing = [i for i, r in enumerate(unit.readers) if not r.gate]
        weights = [1.0 / max(fits[i].energy, 1e-30) for i in choosing]

        def joint(objectives) -> float:  # the relative errors summed, less the readers' count
            return sum(w * o for w, o in zip(weights, objectives))

        chosen = select_channels_jointly([fits[i] for i in choosing], n, unit.n_keep, ridge, weights=weights)
        data_free = joint([self._fallback_objective(index, unit, unit.readers[i], fits[i]) for i in choosing])
        candidates = []
        if chosen is not None:
            for kept in (chosen[0], unit.kept):
                solved = [refit(fits[i], kept, n, ridge) for i in choosing]
                err = joint([objective(fits[i], _embed(w, kept, n), b) for i, (w, b) in zip(choosing, solved)])
                candidates.append((err, kept, dict(zip(choosing, solved))))
        best = min(candidates, key=lambda c: c[0]) if candidates else None
        count = len(choosing)
        error = {"data_free": (data_free + count) / count}
        if best is None or best[0] >= data_free:
            entry, kept = fallback("fell back to the data-free plan (ill-conditioned)" if best is None else
                                   "kept the data-free plan (lower error on the calibration data)")
            error["calibrated"] = error["data_free"] if best is None else (best[0] + count) / count
            entry["error"] = {k: float(f"{v:.6g}") for k, v in error.items()}
            entry["rows"] = [f.rows for f in fits]
            return entry, kept
        _, kept, solved = best
        unit.prune(index, kept)
        refitted, notes = [], []
        gates = [i for i, r in enumerate(unit.readers) if r.gate]
        for i in gates:  # its input channels are as they were: the first statistics serve
            w, b = refit(fits[i], kept, n, ridge)
            _write(index, unit.readers[i], len(kept), w, b)
            refitted.append(unit.readers[i].layer.name + " (gate)")
        if gates:  # the gates changed what the others read: their statistics again, on the kept channels
            again, _ = _collect(GraphIndex(index.model), [unit.readers[i] for i in choosing],
                                [captured[i] for i in choosing], calib, len(kept), out_kept)
            index = GraphIndex(index.model)
            for i, fit in zip(choosing, again):
                solution = None if fit is None else fit.solve(ridge)
                if solution is None:
                    notes.append(f"{unit.readers[i].layer.name} kept its pruned columns (ill-conditioned)")
                    continue
                solved[i] = solution
        for i in choosing:
            if i in solved:
                _write(index, unit.readers[i], len(kept), *solved[i])
                refitted.append(unit.readers[i].layer.name)
        entry = unit.entry(kept)
        how = "selected on the calibration data" if kept is not unit.kept else "the criterion's selection"
        entry["calibration"] = f"{how}, {len(refitted)} of {len(unit.readers)} readers refitted" + (
            "; " + "; ".join(notes) if notes else "")
        entry["refitted"] = refitted
        entry["rows"] = [f.rows for f in fits]
        error["calibrated"] = (best[0] + count) / count
        entry["error"] = {k: float(f"{v:.6g}") for k, v in error.items()}
        return entry, kept

    @staticmethod
    def _fallback_objective(index: GraphIndex, unit: Unit, reader: Reader, fit: LeastSquaresFit) -> float:
        if unit.chain is not None:
            return _data_free_objective(fit, index, unit.chain[0], reader, unit.chain[2])
        w = _matrix(reader.layer, index.array(reader.layer.weight).astype(np.float64)) * reader.layer.alpha
        g = w.shape[1] // unit.channels
        cols = (unit.kept[:, None] * g + np.arange(g)).ravel()
        return objective(fit, _embed(w[:, cols], unit.kept, unit.channels), _bias(index, reader.layer, len(w)))


def drifted_producers(index: GraphIndex, unit: Unit, units: list[Unit]) -> list[Layer]:
    """The unit's producers downstream of a layer that an earlier unit rewrites: their inputs
    differ from the original model's, so they are refitted to their original outputs
    (sequential reconstruction) before the unit's channels are chosen on what they feed."""
    earlier = set()
    for other in units[:units.index(unit)]:
        earlier.update(p.node.name for p in other.producers)
        earlier.update(r.layer.node.name for r in other.readers)
    drifted = []
    for p in unit.producers:
        seen, stack = set(), [t for t in p.node.input[:1]]
        while stack:
            node = index.producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            if node.name in earlier:
                drifted.append(p)
                break
            seen.add(node.name)
            stack.extend(t for t in node.input if t and not index.is_weight(t))
    return drifted


def refit_producer(index: GraphIndex, reader: Reader, captured: Captured, calib: CalibrationSet, ridge: float,
                   out_kept: dict) -> dict | None:
    """A drifted producer refitted on the compressed model's input to its original output,
    written only where that lowers the error: what it did (relative errors), or None."""
    fit = _collect(index, [reader], [captured], calib, 1, out_kept, keep=[reader.layer.node.input[0]])[0][0]
    solution = None if fit is None else fit.solve(ridge)
    if solution is None:
        return None
    layer = reader.layer
    w = _matrix(layer, index.array(layer.weight).astype(np.float64)) * layer.alpha
    before, after = objective(fit, w, _bias(index, layer, len(w))), objective(fit, *solution)
    energy = max(fit.energy, 1e-30)
    done = {"layer": layer.name, "rows": fit.rows, "error": {"before": float(f"{(before + energy) / energy:.6g}"),
                                                            "after": float(f"{(after + energy) / energy:.6g}")}}
    if after < before:
        _set_layer(index, layer, *solution)
    else:
        done["error"]["after"] = done["error"]["before"]
    return done


def _write(index: GraphIndex, reader: Reader, kept: int, w_new: np.ndarray, b_new: np.ndarray) -> None:
    """A refitted reader's weights, from the fit's channel-major columns to its layout."""
    if reader.interleaved:
        w_new = w_new[:, np.argsort(channel_major(kept, w_new.shape[1] // kept))]
    _set_layer(index, reader.layer, w_new, b_new)


def _collect(index: GraphIndex, readers: list[Reader], captured: list[Captured], calib: CalibrationSet,
             channels: int, out_kept: dict, keep_rows: int = 0, producer_input: str | None = None,
             keep: Iterable[str] = ()) -> tuple[list[LeastSquaresFit | None], tuple[np.ndarray, np.ndarray] | None]:
    """Least-squares statistics of each reader: the compressed model's inputs (one run over the
    calibration set for all) -> the original's outputs (the outputs it still writes, after
    earlier units removed some; a residual operand's drift added). None for a reader whose
    input does not give the captured rows. With ``keep_rows`` > 0 (one reader), also up to
    that many rows of ``producer_input`` and their targets, for block refinement. The run
    starts from what ``calib.cache`` holds; ``keep``: tensors it should hold for later runs
    (the unit's producers' inputs, which its own rewrite leaves valid)."""
    keep = [t for t in keep if t and not index.is_weight(t)]
    names = list(keep)
    for r in readers:
        names.append(r.layer.node.input[0])
        if r.problem.residual:
            names.append(r.problem.residual[0])
    if keep_rows:
        names.append(producer_input)
    cache = calib.cache or ActivationCache(0)
    fits: list = [None] * len(readers)
    failed = [False] * len(readers)
    inputs, targets = [], []

    def add(out: dict, i: int, entry) -> None:
        r, (count, picks, target, skip_orig) = readers[i], entry
        layer, problem = r.layer, r.problem
        f_new = _features(layer, out[layer.node.input[0]], index.initializers[layer.weight].dims, picks, count)
        if f_new is None or f_new.shape[1] % channels:
            failed[i] = True
            return
        if r.interleaved:
            f_new = f_new[:, channel_major(channels, f_new.shape[1] // channels)]
        cols = out_kept.get(layer.node.name)
        target = target.astype(np.float64)
        if cols is not None:
            target = target[:, cols]
        if skip_orig is not None:
            skip_new = _output_rows(layer, out[problem.residual[0]], picks)
            skip_orig = skip_orig if cols is None or skip_orig.shape[1] == skip_new.shape[1] else skip_orig[:, cols]
            if skip_new.shape == skip_orig.shape == target.shape:
                drift = skip_orig.astype(np.float64) - skip_new
                scale = problem.residual[1]
                if scale is not None and cols is not None and len(scale) != drift.shape[1]:
                    scale = scale[cols]
                target += drift if scale is None else drift / scale
        if fits[i] is None:
            fits[i] = LeastSquaresFit(f_new.shape[1], target.shape[1])
        fits[i].add(f_new, target)
        room = keep_rows - sum(map(len, inputs))
        if keep_rows and room > 0:  # a fully connected chain: the producer's input rows are the consumer's rows
            x_in = out[producer_input].reshape(-1, out[producer_input].shape[-1])
            x_in = x_in if picks is None else x_in[picks]
            inputs.append(x_in[:room].astype(np.float64))
            targets.append(target[:room])

    taps = cache.taps(index.model, names, "real", calib.batch_count, keep)
    for b, out in enumerate(taps.over(calib.batches())):
        for i, cap in enumerate(captured):
            if not failed[i] and b < len(cap.real):
                add(out, i, cap.real[b])
    mixing = [i for i, cap in enumerate(captured) if cap.mixed]
    if mixing:
        taps = cache.taps(index.model, names, "mixed", calib.mixed_batch_count, keep)
        for b, out in enumerate(taps.over(calib.mixed_batches())):
            for i in mixing:
                if not failed[i] and b < len(captured[i].mixed):
                    add(out, i, captured[i].mixed[b])
    fits = [None if bad or f is None or not f.rows else f for f, bad in zip(fits, failed)]
    rows = (np.concatenate(inputs), np.concatenate(targets)) if inputs else None
    return fits, rows
