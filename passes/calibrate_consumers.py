"""Refit each consumer on calibration data so it reproduces the original layer's output.

    original:   ... -> x (N channels)  -> C(W, b) -> y
    compressed: ... -> x' (P channels) -> C(W', b') -> y'      W', b' = argmin ||y' - y||^2 (+ ridge)

Layers are refitted in graph order, each on activations of the model as already refitted,
so later layers correct what earlier ones left. The fit is kept only where it lowers the
error over the data-free compensation on the same statistics; an ill-conditioned solve
falls back to the data-free weights with a note.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_merge.graph import GraphIndex, attr
from onnx_merge.groups import Layer, describe_layer
from onnx_merge.math.calibrate import LeastSquaresFit, im2col
from onnx_merge.runtime import make_session, match_inputs

from .merge_channels import _add_consumer_bias

log = logging.getLogger("onnx_merge")


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    existing = {o.name for o in tapped.graph.output}
    for name in names:
        if name not in existing:
            tapped.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return tapped.SerializeToString()


def _features(layer: Layer, x: np.ndarray, weight_shape) -> np.ndarray | None:
    node = layer.node
    if node.op_type == "Conv":
        if x.ndim != 4 or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        k = list(weight_shape[2:])
        return im2col(x, k, attr(node, "strides", [1, 1]), attr(node, "pads", [0, 0, 0, 0]),
                      attr(node, "dilations", [1, 1]))
    return x.reshape(len(x), -1) if x.ndim == 2 or node.op_type == "Gemm" else x.reshape(-1, x.shape[-1])


def _matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """Weights as (outputs, features) in the feature order of _features."""
    if layer.node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if layer.in_axis == 1 else w.T


def _bias(index: GraphIndex, layer: Layer, outputs: int) -> np.ndarray:
    name = layer.bias if layer.node.op_type == "MatMul" else (layer.node.input[2] if len(layer.node.input) > 2 else "")
    if not name:
        return np.zeros(outputs)
    return np.broadcast_to(index.array(name).reshape(-1).astype(np.float64), (outputs,)) * layer.beta


def _objective(fit: LeastSquaresFit, w: np.ndarray, b: np.ndarray) -> float:
    """The fit's squared error up to a constant, for the weights (w, b)."""
    wa = np.hstack([w, b[:, None]])
    return float(np.einsum("mf,fg,mg->", wa, fit.gram, wa) - 2.0 * np.einsum("mf,fm->", wa, fit.cross))


class CalibrateConsumers:
    name = "calibrate-consumers"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        opts = ctx.options
        if opts.calibration is None or not getattr(ctx, "plans", None):
            return False
        original = onnx.load_from_string(ctx.original)
        orig_index = GraphIndex(original)
        taps = [chain.consumer.node.input[0] for chain, _, _ in ctx.plans]
        orig_session = make_session(_with_outputs(original, taps), optimize=True)
        feeds = match_inputs(orig_session, opts.calibration, "--calibration")
        total = len(next(iter(feeds.values())))
        batch = opts.calibration_batch
        fixed = orig_session.get_inputs()[0].shape[0] if orig_session.get_inputs()[0].shape else None
        if isinstance(fixed, int) and fixed > 0:  # a fixed batch dimension: whole chunks of it only
            batch, total = fixed, total - total % fixed
        kept_rows = {chain.producer.node.name: comp.kept for chain, _, comp in ctx.plans}
        report = {r["layer"]: r for r in ctx.report.get("layers", [])}
        changed = False
        steps = ctx.plans if ctx.progress is None else ctx.progress(ctx.plans, desc="calibrating", unit="layer")
        for chain, _, _ in steps:
            index = GraphIndex(model)
            node = next(n for n in model.graph.node if n.name == chain.consumer.node.name)
            layer = describe_layer(index, node)
            orig_layer = describe_layer(orig_index, next(n for n in original.graph.node if n.name == node.name))
            w_orig = _matrix(orig_layer, orig_index.array(orig_layer.weight).astype(np.float64)) * orig_layer.alpha
            b_orig = _bias(orig_index, orig_layer, w_orig.shape[0])
            rows = kept_rows.get(node.name)
            if rows is not None:
                w_orig, b_orig = w_orig[rows], b_orig[rows]
            current = index.array(layer.weight)
            w_cur = _matrix(layer, current.astype(np.float64)) * layer.alpha
            b_cur = _bias(index, layer, w_cur.shape[0])
            session = make_session(_with_outputs(model, [chain.consumer.node.input[0]]), optimize=True)
            tap = chain.consumer.node.input[0]
            fit = LeastSquaresFit(w_cur.shape[1], w_cur.shape[0])
            rng = np.random.default_rng(0)
            for start in range(0, total, batch):
                part = {k: v[start:start + batch] for k, v in feeds.items()}
                x_orig = orig_session.run([tap], part)[0]
                x_new = session.run([tap], part)[0]
                f_orig = _features(orig_layer, x_orig, orig_index.initializers[orig_layer.weight].dims)
                f_new = _features(layer, x_new, index.initializers[layer.weight].dims)
                if f_orig is None or f_new is None:
                    break
                if len(f_new) > opts.calibration_rows:  # conv patches: a fixed random subset per batch
                    pick = rng.choice(len(f_new), opts.calibration_rows, replace=False)
                    f_new, f_orig = f_new[pick], f_orig[pick]
                fit.add(f_new, f_orig @ w_orig.T + b_orig)
            solved = fit.solve() if fit.rows else None
            entry = report.get(chain.name, {})
            if solved is None:
                entry["calibration"] = "fell back to data-free weights (ill-conditioned or unsupported layout)"
                log.info("%s: calibration fell back: ill-conditioned or unsupported", node.name)
                continue
            w_new, b_new = solved
            if _objective(fit, w_new, b_new) >= _objective(fit, w_cur, b_cur):
                entry["calibration"] = "kept data-free weights (fit was not better)"
                continue
            w_layout = w_new / layer.alpha
            if layer.node.op_type == "Conv":
                w_layout = w_layout.reshape(current.shape)
            elif layer.in_axis == 0:
                w_layout = w_layout.T
            index.set_array(layer.weight, w_layout.astype(current.dtype))
            _add_consumer_bias(index, layer, b_new - b_cur)
            entry["calibration"] = f"refitted on {fit.rows} rows"
            changed = True
        return changed
