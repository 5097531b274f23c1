"""Give every layer its own weight and bias initializers.

    MatMul(x, W1) -> Add(., b)          MatMul(x, W1) -> Add(., b)
    MatMul(y, W2) -> Add(., b)   becomes  MatMul(y, W2) -> Add(., b_copy)

The torch dynamo exporter stores identical tensors once: with a zero init, one zero bias (often
a LayerNorm's bias as well) is read by every Linear of a transformer, and a layer whose bias is
shared cannot be sliced without changing the others. Copying changes no value. Biases are always
copied; a weight only when all its values are equal (zeros or ones an exporter stored once):
a learned weight read by two layers is a tie the model means (cross-layer sharing), and is left
whole. Copies that still equal their source at the end are pointed back at it by
``ReshareCopies``, so nothing grows where nothing was removed.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_merge.graph import GRAPH_OUTPUT, GraphIndex

# Inputs of a layer that hold its parameters; the first is the weight.
PARAMETER_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


def _bias_slot(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """The constant input of an Add that alone follows a MatMul (a Linear's bias)."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for slot, other in ((1, 0), (0, 1)):
        source = index.producer.get(node.input[other])
        if (index.is_weight(node.input[slot]) and source is not None and source.op_type == "MatMul"
                and index.sole_reader(node.input[other]) is node):
            return slot
    return None


def parameter_uses(index: GraphIndex) -> list[tuple[onnx.NodeProto, int]]:
    """(node, input slot) for every layer parameter that is a shared initializer."""
    uses = []
    for node in index.graph.node:
        slots = list(PARAMETER_SLOTS.get(node.op_type, ()))
        if (bias := _bias_slot(index, node)) is not None:
            slots.append(bias)
        for slot in slots:
            name = node.input[slot] if slot < len(node.input) else ""
            if not name or not index.is_weight(name) or len(index.readers[name]) < 2:
                continue
            values = index.array(name)
            if slot != 1 or node.op_type == "Add" or values.size and np.all(values == values.flat[0]):
                uses.append((node, slot))
    return uses


class UnshareWeights:
    name = "unshare-weights"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        index = GraphIndex(model)
        copies = ctx.report.setdefault("unshared", {})
        claimed: set[str] = set()  # the first layer reading a tensor keeps the original
        added = 0
        for node, slot in parameter_uses(index):
            name = node.input[slot]
            if name not in claimed and not self._read_elsewhere(index, name, node):
                claimed.add(name)
                continue
            claimed.add(name)
            copy = index.unique_name(f"{name}_{node.name or node.output[0]}")
            index.add_initializer(copy, index.array(name).copy())
            node.input[slot] = copy
            copies[copy] = name
            added += int(np.prod(index.initializers[name].dims, dtype=np.int64))
        ctx.report["unshared_params"] = ctx.report.get("unshared_params", 0) + added
        return added > 0

    @staticmethod
    def _read_elsewhere(index: GraphIndex, name: str, node: onnx.NodeProto) -> bool:
        """Whether a reader that is not a layer parameter use (a LayerNorm, a graph output) reads
        ``name``: then it keeps the original and every layer gets a copy."""
        for reader in index.readers[name]:
            if reader is GRAPH_OUTPUT:
                return True
            if reader is node:
                continue
            slots = list(PARAMETER_SLOTS.get(reader.op_type, ()))
            if (bias := _bias_slot(index, reader)) is not None:
                slots.append(bias)
            if not any(s < len(reader.input) and reader.input[s] == name for s in slots):
                return True
        return False


class ReshareCopies:
    """Point readers of a copy made by UnshareWeights back at its source when both still hold the
    same values (the layer was left as it was)."""

    name = "reshare-copies"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        copies = ctx.report.get("unshared", {})
        if not copies:
            return False
        index = GraphIndex(model)
        back = {}
        for copy, source in copies.items():
            if copy in index.initializers and source in index.initializers:
                a, b = index.initializers[copy], index.initializers[source]
                if list(a.dims) == list(b.dims) and a.data_type == b.data_type and np.array_equal(
                        index.array(copy), index.array(source)):
                    back[copy] = source
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in back:
                    node.input[i] = back[name]
        if back:
            from .cleanup import RemoveUnused

            RemoveUnused().run(model, ctx)
        return bool(back)
