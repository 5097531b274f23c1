"""Choose kept channels and refit each consumer on calibration data.

    original:   ... -> x (N channels)  -> C(W, b) -> y
    compressed: ... -> x' (P channels) -> C(W', b') -> y'      kept, W', b' = argmin ||y' - y||^2 (+ ridge)

Chains are handled in graph order, each on activations of the model as already compressed,
so later layers correct what earlier ones left. A consumer whose output (or its BN's) is added
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

import numpy as np
import onnx

from onnx_merge.calibration import CalibrationSet
from onnx_merge.graph import GraphIndex, attr
from onnx_merge.groups import Chain, Layer, activation_kind, describe_layer
from onnx_merge.math import Compensation, compensate_consumer
from onnx_merge.math.calibrate import LeastSquaresFit, im2col, objective, refit, same_pads, select_channels
from onnx_merge.math.refine import DenseBlock, refine_block
from onnx_merge.runtime import graph_inputs, make_session, match_inputs

from .merge_channels import (activation_slope, add_consumer_bias, apply_plan, consumer_view, current_bias, describe,
                             fix_shapes, from_consumer_view, shrink_producer)

log = logging.getLogger("onnx_merge")
MAX_FEATURES = 8192  # the F x F Gram matrix of a wider consumer would not fit comfortably
MAX_REFINE_WORK = 5e8  # rows x parameters of one block refinement: bounds its time and the rows it holds
MIN_REFINE_ROWS = 256  # fewer rows than this cannot hold a quarter out and still fit a block
# A consumer whose samples give fewer rows than this per feature is also fitted on mixed samples
# (onnx_merge/calibration.py): a Gemm reading one row per sample. A convolution's patches give
# hundreds of rows per sample; there mixed images only cost time (measured on ResNet-56).
MIXED_BELOW_ROWS_PER_FEATURE = 10


def truncated(model: onnx.ModelProto, taps: list[str]) -> bytes:
    """A model computing only ``taps``: the nodes they depend on, their weights, the graph inputs."""
    index = GraphIndex(model)
    needed, stack = set(), list(taps)
    while stack:
        node = index.producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(
        nodes, model.graph.name, [i for i in model.graph.input if i.name in used or i.name not in index.initializers],
        [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in taps],
        [t for t in model.graph.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version).SerializeToString()


def residual_operand(index: GraphIndex, layer: Layer) -> tuple[str, np.ndarray | None] | None:
    """The other operand of the Add that the consumer's output alone feeds (directly or through
    a BatchNormalization, whose per-channel scale is returned too), when that operand is computed.

    Fitting the consumer to (original sum - compressed operand) instead of its own original
    output lets it also cancel the error that earlier layers left in the residual stream.
    """
    out, scale = layer.node.output[0], None
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


def _output_rows(layer: Layer, y: np.ndarray) -> np.ndarray:
    """A consumer-shaped output (B, M, ...) as rows in the order of _features."""
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]) if layer.node.op_type == "Conv" else y.reshape(-1, y.shape[-1])


def _features(layer: Layer, x: np.ndarray, weight_shape) -> np.ndarray | None:
    """Consumer inputs as rows of features in the weight's (channel, taps) order."""
    node = layer.node
    if node.op_type == "Conv":
        d = len(weight_shape) - 2
        if x.ndim != d + 2:
            return None
        kernel, strides, dilations = list(weight_shape[2:]), attr(node, "strides", [1] * d), attr(node, "dilations", [1] * d)
        auto_pad = attr(node, "auto_pad", "NOTSET")
        pads = (attr(node, "pads", [0] * 2 * d) if auto_pad == "NOTSET" else
                same_pads(x.shape[2:], kernel, strides, dilations, auto_pad))
        return im2col(x, kernel, strides, pads, dilations)
    if node.op_type in ("Gemm", "MatMul"):
        return x.reshape(-1, x.shape[-1])
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


def _data_free_objective(fit: LeastSquaresFit, index: GraphIndex, chain: Chain, comp: Compensation) -> float:
    """Error of the data-free plan on the same statistics, in the full feature space."""
    c = chain.consumer
    weight = index.array(c.weight)
    new_view, delta = compensate_consumer(consumer_view(weight, c, chain.channels, chain.block, chain.interleaved), comp)
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


def refinable(index: GraphIndex, chain: Chain) -> float | None:
    """The activation's negative slope where the chain is a block ``refine_block`` models:
    Gemm/MatMul -> one ReLU-like activation -> Gemm/MatMul, each layer able to carry a bias;
    None otherwise."""
    if chain.bn is not None or chain.block != 1 or len(chain.path) != 1 or not chain.mergeable:
        return None
    for layer in (chain.producer, chain.consumer):
        op = layer.node.op_type
        if op not in ("Gemm", "MatMul") or (op == "Gemm" and attr(layer.node, "transA", 0)) or (
                op == "MatMul" and layer.bias is None):
            return None
    return activation_slope(index, chain) if activation_kind(index, chain.path[0]) == "homogeneous" else None


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
    start = DenseBlock(w1, _bias(index, p, len(w1)), w2, _bias(index, c, len(w2)), slope)
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


class CalibrateConsumers:
    name = "calibrate-consumers"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        opts = ctx.options
        if opts.calibration is None or not ctx.plans:
            return False
        original = onnx.load_from_string(ctx.original)
        orig_index = GraphIndex(original)
        orig_nodes = {n.name: n for n in original.graph.node}
        feeds = match_inputs(graph_inputs(original), opts.calibration, "--calibration")
        total, batch = len(next(iter(feeds.values()))), opts.calibration_batch
        first = original.graph.input[0].type.tensor_type.shape.dim
        fixed = first[0].dim_value if len(first) and first[0].HasField("dim_value") else None
        if isinstance(fixed, int) and fixed > 0:  # a fixed batch dimension: whole chunks of it only
            batch, total = fixed, total - total % fixed
        calib = CalibrationSet({k: v[:total] for k, v in feeds.items()}, batch, opts.calibration_mixup)
        ctx.report["calibration"] = {"samples": calib.samples, "mixed": calib.mixed}
        if opts.calibration_mixup and not calib.mixed:
            log.info("calibration inputs are not all floating point: no mixed samples, %d samples alone", calib.samples)
        layers = ctx.report.setdefault("layers", [])
        steps = ctx.plans if ctx.progress is None else ctx.progress(ctx.plans, desc="calibrating", unit="layer")
        for chain, plan_opts, comp in steps:
            index = GraphIndex(model)
            slope = refinable(index, chain) if opts.refine_iterations else None
            # rows kept for refinement: the budget bounds its time and memory
            cap = 0 if slope is None else int(min(opts.calibration_rows,
                                                  MAX_REFINE_WORK // refine_parameters(index, chain, len(comp.kept))))
            fit, rows = self._statistics(index, orig_index, orig_nodes, chain, calib, opts,
                                         keep_rows=cap if cap >= MIN_REFINE_ROWS else 0)
            if fit is None:
                entry = apply_plan(index, chain, comp, plan_opts)
                entry["calibration"] = "fell back to the data-free plan (too wide or unsupported layout)"
                layers.append(entry)
                continue
            candidates = []  # (error on the calibration data, kept, W', b') -- lowest wins
            chosen = select_channels(fit, chain.channels, len(comp.kept), ridge=opts.calibration_ridge)
            if chosen is not None:
                for kept in (chosen[0], comp.kept):
                    w_new, b_new = refit(fit, kept, chain.channels, opts.calibration_ridge)
                    candidates.append((objective(fit, _embed(w_new, kept, chain.channels), b_new), kept, w_new, b_new))
            best = min(candidates, key=lambda c: c[0]) if candidates else None
            if best is None or best[0] >= _data_free_objective(fit, index, chain, comp):
                entry = apply_plan(index, chain, comp, plan_opts)
                entry["calibration"] = ("fell back to the data-free plan (ill-conditioned)" if best is None else
                                        "kept the data-free plan (lower error on the calibration data)")
            else:
                _, kept, w_new, b_new = best
                self._rewrite(index, chain, kept, w_new, b_new)
                entry = describe(chain, Compensation.prune(chain.channels, kept), "calibrated")
                how = "selected on the calibration data" if kept is not comp.kept else "the criterion's selection"
                entry["calibration"] = f"{how}, consumer refitted on {fit.rows} rows"
            if rows is not None:
                refined, entry["refinement"] = refine(index, chain, slope, rows, opts.refine_iterations)
                if refined:
                    entry["method"] += " + refined"
            elif slope is not None:
                entry["refinement"] = (f"not refined: {refine_parameters(index, chain, len(comp.kept))} parameters "
                                       "are too many for the refinement budget")
            layers.append(entry)
        return True

    @staticmethod
    def _statistics(index, orig_index, orig_nodes, chain, calib: CalibrationSet, opts, keep_rows: int
                    ) -> tuple[LeastSquaresFit | None, tuple[np.ndarray, np.ndarray] | None]:
        """Least-squares statistics of the consumer: compressed inputs -> original outputs; with
        ``keep_rows`` > 0, also up to that many of the producer's input rows and their targets,
        for block refinement."""
        layer = chain.consumer
        if layer.node.op_type not in ("Conv", "Gemm", "MatMul"):  # a ConvTranspose reads its weight transposed
            return None, None
        orig_layer = describe_layer(orig_index, orig_nodes[layer.node.name])
        w_orig = _matrix(orig_layer, orig_index.array(orig_layer.weight).astype(np.float64)) * orig_layer.alpha
        b_orig = _bias(orig_index, orig_layer, w_orig.shape[0])
        if w_orig.shape[1] > MAX_FEATURES:
            return None, None
        residual = residual_operand(index, layer)
        taps = [layer.node.input[0]] + ([residual[0]] if residual else [])
        new_taps = taps + ([chain.producer.node.input[0]] if keep_rows else [])
        orig_session = make_session(truncated(orig_index.model, taps), optimize=True)
        session = make_session(truncated(index.model, new_taps), optimize=True)
        fit = LeastSquaresFit(w_orig.shape[1], w_orig.shape[0])
        inputs, targets = [], []
        rng = np.random.default_rng(0)

        def batches():  # the mixed samples only where the samples' own rows, counted first, are too few
            yield from calib.batches()
            if fit.rows < MIXED_BELOW_ROWS_PER_FEATURE * w_orig.shape[1]:
                yield from calib.mixed_batches()

        for part in batches():
            x_orig, *skip_orig = orig_session.run(taps, {i.name: part[i.name] for i in orig_session.get_inputs()})
            x_new, *rest = session.run(new_taps, {i.name: part[i.name] for i in session.get_inputs()})
            skip_new = rest[:len(taps) - 1]
            f_orig = _features(orig_layer, x_orig, orig_index.initializers[orig_layer.weight].dims)
            f_new = _features(layer, x_new, index.initializers[layer.weight].dims)
            if f_orig is None or f_new is None or f_new.shape[1] != w_orig.shape[1]:
                return None, None
            target = f_orig @ w_orig.T + b_orig
            if chain.interleaved:
                f_new = f_new[:, channel_major(chain.channels, f_new.shape[1] // chain.channels)]
            if residual is not None and skip_orig[0].shape == skip_new[0].shape:
                drift = _output_rows(layer, skip_orig[0].astype(np.float64) - skip_new[0])
                if drift.shape == target.shape:  # a broadcast operand is left uncorrected
                    target += drift if residual[1] is None else drift / residual[1]
            # a fully connected chain: the producer's input rows are the consumer's rows
            x_in = rest[-1].reshape(-1, rest[-1].shape[-1]) if keep_rows else None
            if len(f_new) > opts.calibration_rows:  # conv patches, tokens: a fixed random subset per batch
                pick = rng.choice(len(f_new), opts.calibration_rows, replace=False)
                f_new, target = f_new[pick], target[pick]
                x_in = None if x_in is None else x_in[pick]
            fit.add(f_new, target)
            room = keep_rows - sum(map(len, inputs))
            if x_in is not None and room > 0:
                inputs.append(x_in[:room].astype(np.float64))
                targets.append(target[:room])
        rows = (np.concatenate(inputs), np.concatenate(targets)) if inputs else None
        return (fit, rows) if fit.rows else (None, None)

    @staticmethod
    def _rewrite(index: GraphIndex, chain: Chain, kept: np.ndarray, w_new: np.ndarray, b_new: np.ndarray) -> None:
        shrink_producer(index, chain, kept)
        if chain.interleaved:  # the fit's channel-major columns back to the consumer's layout
            w_new = w_new[:, np.argsort(channel_major(len(kept), w_new.shape[1] // len(kept)))]
        _set_layer(index, chain.consumer, w_new, b_new)
        fix_shapes(index, chain, len(kept))
