"""Remove whole attention heads (``--heads R``).

    Q/K/V (C -> H d) -> heads ... -> softmax(Q K^T) V -> ... -> O (H d -> C)
becomes
    Q/K/V (C -> H' d) -> heads ... -> softmax(Q K^T) V -> ... -> O (H' d -> C)

One head is its Q, K and V columns (in a fused QKV weight, its columns in each third) and its
rows of the output projection (onnx_merge/attention.py finds them). Every Reshape shape, Split
size and per-head constant on the way has its head axis scaled by H'/H; a shape computed from
Shape ops follows by itself, a constant in it is rewritten. The removed heads' value bias
reaches every token unchanged (softmax rows sum to 1), so it is added to the output
projection's bias: the result equals the original with the removed heads' V weight columns
zeroed. Every rewrite is checked by shape inference on the result; a layer whose shapes do not
come out as planned is left whole.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_merge.attention import Attention, HeadLayout, concrete_dims, find_attention
from onnx_merge.graph import GraphIndex, attr, set_attr
from onnx_merge.groups import Layer, Rejected
from onnx_merge.math.heads import head_importance, kept_heads, value_bias_offset
from onnx_merge.shapes import drop_value_info

log = logging.getLogger("onnx_merge")


def matrix(index: GraphIndex, layer: Layer) -> np.ndarray:
    """A 2-D layer weight as (inputs, outputs)."""
    return np.moveaxis(index.array(layer.weight), layer.in_axis, 0)


def effective_bias(index: GraphIndex, layer: Layer) -> np.ndarray | None:
    return None if layer.bias is None else index.array(layer.bias).reshape(-1).astype(np.float64) * layer.beta


def choose_heads(index: GraphIndex, att: Attention, ratio: float) -> np.ndarray:
    wv, wo = matrix(index, att.v) * att.v.alpha, matrix(index, att.out) * att.out.alpha
    importance = head_importance([wv[:, h.v] for h in att.heads], [wo[h.out, :] for h in att.heads])
    return kept_heads(importance, ratio)


class Rewrite:
    """The edits that remove ``removed`` heads from one attention layer, made on ``index``."""

    def __init__(self, index: GraphIndex, att: Attention, kept: np.ndarray):
        self.index, self.att = index, att
        self.kept = set(int(k) for k in kept)
        self.h, self.h_new = len(att.heads), len(kept)
        self.removed = [h for i, h in enumerate(att.heads) if i not in self.kept]

    def scaled(self, size: int) -> int:
        if size * self.h_new % self.h:
            raise Rejected(f"an axis of {size} does not hold {self.h} heads evenly")
        return size * self.h_new // self.h

    def expected_dims(self) -> dict[str, list[int]]:
        return {t: [self.scaled(d) if a == lay.axis else d for a, d in enumerate(lay.dims)]
                for t, lay in self.att.tensors.items()}

    def plan_nodes(self) -> list:
        """Closures that edit shape-carrying inputs, built before anything is changed."""
        edits = []
        for node in self.att.nodes:
            out = self.att.tensors.get(node.output[0])
            src = self.att.tensors.get(node.input[0]) if node.input else None
            if node.op_type == "Reshape" and out is not None and out.axis is not None:
                edits.append(self._reshape(node, out))
            elif node.op_type == "Split" and src is not None and src.axis is not None:
                edits.append(self._split(node, src))
            elif node.op_type in ("Slice", "Gather") and src is not None and src.axis is not None:
                axes = self._sliced_axes(node, len(src.dims))
                if src.axis in axes:
                    raise Rejected(f"{node.op_type} {node.name!r} selects along the head axis")
            if node.op_type in ("Mul", "Div", "Add", "Sub", "Where") and out is not None and out.axis is not None:
                edits += self._operands(node, out)
        return edits

    def _sliced_axes(self, node, rank):
        if node.op_type == "Gather":
            return [int(attr(node, "axis", 0)) % rank]
        axes = node.input[3] if len(node.input) > 3 and node.input[3] else None
        starts = self.index.array(node.input[1])
        return [int(a) % rank for a in (self.index.array(axes) if axes else range(len(starts)))]

    def _new_constant(self, node, slot, value):
        def edit():
            name = self.index.unique_name(f"{node.input[slot]}_heads")
            self.index.add_initializer(name, value)
            node.input[slot] = name
        return edit

    def _entry(self, value: int, size: int, allowzero: bool) -> int:
        if value == -1 or value == 0 and not allowzero:
            return value  # inferred or copied from the input: follows by itself
        if value != size:
            raise Rejected(f"a shape entry {value} stands where the tensor has {size}")
        return self.scaled(size)

    def _reshape(self, node, out: HeadLayout):
        shape_name, axis, allowzero = node.input[1], out.axis, bool(attr(node, "allowzero", 0))
        if self.index.is_weight(shape_name):
            shape = self.index.array(shape_name).copy()
            shape[axis] = self._entry(int(shape[axis]), out.dims[axis], allowzero)
            return self._new_constant(node, 1, shape)
        concat = self.index.producer.get(shape_name)
        if concat is None or concat.op_type != "Concat":
            raise Rejected(f"Reshape {node.name!r} takes a shape computed by something other than Concat")
        inside = {id(n) for n in self.att.nodes}
        if any(isinstance(r, str) or id(r) not in inside for r in self.index.readers.get(shape_name, [])):
            raise Rejected(f"the shape {shape_name!r} of Reshape {node.name!r} is used outside the attention")
        offset = 0
        for slot, part in enumerate(concat.input):
            length = self._length(part)
            if offset <= axis < offset + length:
                if self.index.is_weight(part):
                    value = self.index.array(part).copy().reshape(-1)
                    value[axis - offset] = self._entry(int(value[axis - offset]), out.dims[axis], allowzero)
                    return self._new_constant(concat, slot, value.reshape(self.index.shape(part)))
                if length == 1 and self._pure_heads(out.dims[axis]):
                    # a size read from another tensor's shape (timm's C): the new one is a constant
                    return self._new_constant(concat, slot, np.array([self.scaled(out.dims[axis])], np.int64))
                raise Rejected(f"Reshape {node.name!r}: the head axis's size is computed ({part!r})")
            offset += length
        raise Rejected(f"Reshape {node.name!r}: its shape's parts do not cover the head axis")

    def _length(self, part: str) -> int:
        if self.index.is_weight(part):
            return self.index.size(part)
        dims = self.att.shape_dims.get(part)
        if dims is None or len(dims) != 1:
            raise Rejected(f"the length of shape part {part!r} is not known")
        return int(dims[0])

    def _pure_heads(self, size: int) -> bool:
        """Whether an axis of ``size`` holds heads and head features only (no batch or tokens)."""
        d = self.att.head_dim
        widths = {int(self.index.initializers[p.weight].dims[p.out_axis]) for p in self.att.projections}
        return size in {self.h, self.h * d} | widths

    def _split(self, node, src: HeadLayout):
        axis = int(attr(node, "axis", 0)) % len(src.dims)
        if axis != src.axis:
            return lambda: None
        sizes = []
        for o in node.output:
            lay = self.att.tensors.get(o)
            if lay is None:
                raise Rejected(f"Split {node.name!r} has an output off the attention paths")
            sizes.append(self.scaled(lay.dims[axis]) if lay.axis == axis else lay.dims[axis])
        if len(node.input) > 1 and node.input[1]:
            return self._new_constant(node, 1, np.array(sizes, np.int64))
        if attr(node, "split") is not None:
            return lambda: set_attr(node, "split", sizes)
        if len(set(sizes)) != 1:
            raise Rejected(f"Split {node.name!r} splits evenly, its new parts would not be even")
        return lambda: None

    def _operands(self, node, out: HeadLayout):
        edits = []
        rank = len(out.dims)
        for slot, name in enumerate(node.input):
            if name in self.att.tensors or not name:
                continue
            dims = self.att.shape_dims.get(name)
            if dims is None:
                raise Rejected(f"{node.op_type} {node.name!r}: the shape of {name!r} is not known")
            axis = out.axis - (rank - len(dims))
            if axis < 0 or dims[axis] == 1:
                continue  # the same for every head
            if not self.index.is_weight(name):  # its heads would have to be sliced where it is computed
                raise Rejected(f"{node.op_type} {node.name!r}: {name!r} differs per head and is computed, not "
                               "stored (a per-head attention bias, such as T5's relative positions)")
            if dims[axis] != out.dims[out.axis]:
                raise Rejected(f"{node.op_type} {node.name!r}: {name!r} differs per head")
            keep = [i for i, h in enumerate(out.labels) if h in self.kept]
            edits.append(self._new_constant(node, slot, np.take(self.index.array(name), keep, axis=axis)))
        return edits

    def apply_weights(self) -> None:
        index, att = self.index, self.att
        for p in att.projections:
            gone = set()
            for h in self.removed:
                gone |= set(h.q if p.node is att.q.node else []) | set(h.k if p.node is att.k.node else []) | set(
                    h.v if p.node is att.v.node else [])
            n = int(index.initializers[p.weight].dims[p.out_axis])
            keep = [c for c in range(n) if c not in gone]
            index.set_array(p.weight, np.take(index.array(p.weight), keep, axis=p.out_axis))
            if p.bias is not None and index.size(p.bias) == n:
                bias = index.array(p.bias)
                index.set_array(p.bias, np.take(bias.reshape(-1), keep).reshape(bias.shape[:-1] + (-1,)))
        out = att.out
        n_rows = int(index.initializers[out.weight].dims[out.in_axis])
        rows = sorted(set(range(n_rows)) - {r for h in self.removed for r in h.out})
        if self.offset is not None and out.bias is not None:
            bias = index.array(out.bias)
            index.set_array(out.bias, (bias.astype(np.float64) + (self.offset / out.beta).reshape(bias.shape)).astype(
                bias.dtype))
        index.set_array(out.weight, np.take(index.array(out.weight), rows, axis=out.in_axis))

    def prepare_offset(self) -> None:
        """The removed heads' value-bias contribution, read before any weight is sliced."""
        b_v = effective_bias(self.index, self.att.v)
        if b_v is None:
            self.offset = None
            return
        wo = matrix(self.index, self.att.out) * self.att.out.alpha
        self.offset = value_bias_offset([b_v[h.v] for h in self.removed], [wo[h.out, :] for h in self.removed])


def _apply(model: onnx.ModelProto, ratio: float, skip: set[str]) -> tuple[list, list, dict]:
    """Remove heads in every attention layer not in ``skip``; (done, declined, expected dims)."""
    index = GraphIndex(model)
    found, declined = find_attention(index)
    done, expected, edits, rewrites = [], {}, [], []
    for att in found:
        if att.name in skip:
            continue
        kept = choose_heads(index, att, ratio)
        if len(kept) == len(att.heads):
            continue
        rw = Rewrite(index, att, kept)
        try:
            edits += rw.plan_nodes()
            expected[att.name] = rw.expected_dims()
        except Rejected as exc:
            declined.append((att.name, str(exc)))
            continue
        rw.prepare_offset()
        rewrites.append(rw)
        done.append((att, kept))
    for edit in edits:
        edit()
    for rw in rewrites:
        rw.apply_weights()
        drop_value_info(model, set(rw.att.tensors) | {p.output for p in rw.att.projections} |
                        {p.node.output[0] for p in rw.att.projections})
    return done, declined, expected


class PruneHeads:
    name = "prune-heads"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        ratio = getattr(ctx.options, "heads", 0.0)
        if not ratio:
            return False
        skip: set[str] = set()
        reasons = {}
        for _ in range(3):  # a layer whose shapes do not infer as planned is left whole, then retried
            trial = onnx.ModelProto()
            trial.CopyFrom(model)
            done, declined, expected = _apply(trial, ratio, skip)
            reasons.update(dict(declined))
            planned = tuple(t for att, _ in done for t in expected[att.name])
            dims = concrete_dims(trial, measure=planned) if done else {}
            wrong = {att.name for att, _ in done
                     if any(dims.get(t) != d for t, d in expected[att.name].items())}
            if not wrong:
                break
            for name in wrong:
                reasons[name] = "the rewritten shapes did not infer as planned"
            skip |= wrong
        else:
            return False
        model.CopyFrom(trial)
        for name, reason in reasons.items():
            ctx.skip(name, f"heads left whole: {reason}")
        for att, kept in done:
            ctx.report.setdefault("heads", []).append({"layer": att.name, "heads": len(att.heads), "kept": len(kept), "head_dim": att.head_dim,
                         "removed": [i for i in range(len(att.heads)) if i not in set(kept.tolist())],
                         "q": att.q.name, "k": att.k.name, "v": att.v.name, "out": att.out.name})
            log.info("%s: heads %d -> %d", att.name, len(att.heads), len(kept))
        return bool(done)
