"""Fold BatchNormalization into the Conv or Gemm before it.

    Conv(x, W, b) -> BN(gamma, beta, mu, var)      becomes      Conv(x, W', b')
    W' = W * gamma / sigma (per output channel),   b' = beta + gamma / sigma * (b - mu)

Exact whenever the layer's output is read by the BN alone (and the BN is in inference mode).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_merge.graph import GraphIndex, attr
from onnx_merge.ops import weight_axes
from onnx_merge.shapes import drop_value_info


def _match(index: GraphIndex, bn: onnx.NodeProto):
    layer = index.producer.get(bn.input[0])
    if layer is None or layer.op_type not in ("Conv", "Gemm"):
        return None, "not preceded by Conv or Gemm"
    if index.sole_reader(bn.input[0]) is not bn:
        return None, f"{layer.name}'s output is also read elsewhere"
    if attr(bn, "training_mode", 0) or any(o for o in bn.output[1:]):
        return None, "training mode"
    names = [layer.input[1]] + list(bn.input[1:5]) + ([layer.input[2]] if len(layer.input) > 2 and layer.input[2] else [])
    for name in names:
        if not index.is_weight(name):
            return None, f"{name!r} is not an initializer"
        owner = layer if name in layer.input else bn
        if index.shared_with(name, owner):
            return None, f"{name!r} is shared"
    if layer.op_type == "Gemm" and (attr(layer, "transA", 0) or float(attr(layer, "alpha", 1.0)) != 1.0
                                    or float(attr(layer, "beta", 1.0)) != 1.0):
        return None, "Gemm with transA/alpha/beta"
    return layer, ""


class FoldBatchNorm:
    name = "fold-batchnorm"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        index = GraphIndex(model)
        folded = []
        for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
            layer, why = _match(index, bn)
            if layer is None:
                ctx.skip(bn.name, f"BatchNormalization not folded: {why}")
                continue
            out_axis = weight_axes(layer)[0]
            w = index.array(layer.input[1])
            w_rows = np.moveaxis(w, out_axis, 0)
            params = index.batchnorm(bn)
            bias = index.array(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
            n = w_rows.shape[0]
            if bias is not None:
                bias = np.broadcast_to(np.reshape(bias, -1), (n,))
            new_w, new_b = params.fold(w_rows, bias)
            index.set_array(layer.input[1], np.moveaxis(new_w, 0, out_axis))
            if len(layer.input) > 2 and layer.input[2]:
                index.set_array(layer.input[2], new_b)
            else:
                index.attach_bias(layer, new_b.astype(w.dtype))
            stale = layer.output[0]
            layer.output[0] = bn.output[0]  # the layer takes over the BN's output tensor
            drop_value_info(model, {stale})
            folded.append(bn)
        for bn in folded:
            model.graph.node.remove(bn)
        if folded:
            ctx.report.setdefault("folded_batchnorm", []).extend(bn.name for bn in folded)
        return bool(folded)
