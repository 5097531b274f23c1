"""Prune channel groups consistently: every group that is no free chain.

    conv_a -> BN -> \\                      conv_a[kept] -> BN[kept] -> \\
                      Add -> Relu -> conv_c     becomes                      Add -> Relu -> conv_c[:, kept]
    conv_b -> BN -> /                      conv_b[kept] -> BN[kept] -> /

Every layer writing the group's channels loses the same output channels, every layer
reading them the same input channels, depthwise convs the same channels (and group count),
an SE gate's expand conv the same output channels. Groups without a residual stream
(depthwise blocks, gates, Concat and Split ranges) are pruned by default; residual streams
only with ``--coupled prune``.
Channels are ranked by the criterion summed over the producers, each producer's scores
divided by their mean so that no single layer's scale decides. Not merging: a channel of a
sum is not a positive multiple of another unless every term is, so the group is pruned.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_merge.groups import Group, find_chains, find_groups
from onnx_merge.graph import GraphIndex, set_attr
from onnx_merge.io import default_opset
from onnx_merge.math import Compensation, importance, select_per_block
from onnx_merge.math.compensation import compensate_along
from onnx_merge.math.propagate import capped_keep, keep_least_costly, relative_error, removal_costs
from onnx_merge.ops import conv_groups
from onnx_merge.shapes import drop_value_info
from onnx_merge.statistics import Stats, tensor_statistics

from .merge_channels import add_consumer_bias, consumer_view, current_bias, shrink_reshape, take_channels

log = logging.getLogger("onnx_merge")


def _channels(index: GraphIndex, group: Group) -> int | str:
    """The group's channel count, or why its members disagree on it."""
    if group.parts:  # a Concat output space: the sum of its inputs' counts
        widths = [_channels(index, part) for part in group.parts]
        n = next((w for w in widths if isinstance(w, str)), None) or sum(widths)
    elif group.split_of is not None:  # a Split output space: its current size
        view, position = group.split_of
        n = view.sizes[position]
    elif not (group.producers or group.depthwise):
        n = group.static_width
    else:
        counts = {int(index.initializers[p.weight].dims[p.out_axis]) for p in group.producers}
        counts |= {int(index.initializers[d.input[1]].dims[0]) for d in group.depthwise}
        if len(counts) != 1:
            return f"producers disagree on the channel count ({sorted(counts)})"
        n = counts.pop()
    return n if isinstance(n, str) else _members_disagree(index, group, n) or n


def _members_disagree(index: GraphIndex, group: Group, n: int) -> str:
    for p in group.driven:
        if int(index.initializers[p.weight].dims[p.out_axis]) != n:
            return f"{p.name!r} writes {index.initializers[p.weight].dims[p.out_axis]} channels into a space of {n}"
    for c in group.consumers:
        features = int(index.initializers[c.weight].dims[c.in_axis]) * conv_groups(c.node)
        if features % n:
            return f"consumer {c.name!r} reads {features} features, not a multiple of {n} channels"
    for node, name in group.per_channel:
        if index.size(name) != n or max(index.shape(name)) != n:
            return f"{node.op_type} {node.name!r} parameter {name!r} is not per channel"
    return ""


def _views(index: GraphIndex, group: Group, kept: np.ndarray, n: int) -> list[tuple[Group, np.ndarray, int]] | str:
    """For every space the group's channels reach through channel Concats and Splits
    (recursively): which of its channels stay when the group keeps ``kept`` of ``n``, and
    its width now; or why that cannot be done. A Concat output is worked out from all its
    parts at once (a part may appear twice: GhostNet's primary and cheap halves)."""
    known = {id(group): (group, kept, n)}
    order, queue, steps = [group], [group], 0
    while queue:
        steps += 1
        if steps > 100000:  # the spaces form a DAG: this is a guard, not a limit met in practice
            return "channel index maps do not settle"
        g = queue.pop(0)
        _, g_kept, _ = known[id(g)]
        reached = []
        for split in g.splits:  # each output of a Split is a range of this space
            offsets = np.cumsum([0] + split.sizes)
            for out, start, stop in zip(split.outputs, offsets[:-1], offsets[1:]):
                part = g_kept[(g_kept >= start) & (g_kept < stop)] - start
                if not len(part):
                    return f"Split {split.node.name!r} would lose a whole output"
                reached.append((out, part, int(stop - start)))
        for target in {id(t): t for t, _ in g.views}.values():  # a Concat's output, from all its parts
            pieces, offset = [], 0
            for part in target.parts:
                if id(part) in known:
                    _, part_kept, width = known[id(part)]
                else:
                    width = _channels(index, part)
                    if isinstance(width, str):
                        return width
                    part_kept = np.arange(width)
                pieces.append(offset + part_kept)
                offset += width
            reached.append((target, np.concatenate(pieces), offset))
        for target, target_kept, total in reached:
            if id(target) not in known:
                order.append(target)
            known[id(target)] = (target, target_kept, total)
            queue.append(target)
    for target in order[1:]:
        if target.blocks > 1:
            return f"a grouped conv reads channels reached through {target.concat and 'Concat' or 'Split'} ranges"
        problem = _members_disagree(index, target, known[id(target)][2])
        if problem:
            return problem
    return [known[id(t)] for t in order[1:]]


def _write_split_sizes(index: GraphIndex, views: list[tuple[Group, np.ndarray, int]]) -> None:
    """Every Split whose outputs shrank gets its new sizes (an input from opset 13, else the attribute)."""
    touched = {}
    for target, kept, _ in views:
        if target.split_of is not None:
            split, position = target.split_of
            split.sizes[position] = len(kept)
            touched[id(split)] = split
    opset = default_opset(index.model) or 13
    for split in touched.values():
        node, sizes = split.node, np.asarray(split.sizes, np.int64)
        if opset < 13:
            set_attr(node, "split", split.sizes)
            continue
        name = index.unique_name(node.name + "_split")
        index.add_initializer(name, sizes)
        if len(node.input) > 1:
            node.input[1] = name
        else:
            node.input.append(name)
        index.readers[name].append(node)
        kept_attrs = [a for a in node.attribute if a.name != "num_outputs"]  # exclusive with the sizes input
        del node.attribute[:]
        node.attribute.extend(kept_attrs)


def _scores(index: GraphIndex, group: Group, n: int, criterion: str) -> np.ndarray:
    total = np.zeros(n)
    for p in group.producers:
        rows = np.moveaxis(index.array(p.weight), p.out_axis, 0).reshape(n, -1)
        # a group is pruned, not merged, and has no single consumer: rank by the norm nearest to what was asked
        s = importance(rows, {"l2-path": "l2-norm", "merge-cost": "l1-norm"}.get(criterion, criterion))
        total += s / (s.mean() if s.mean() > 0 else 1.0)
    return total


def consumer_moments(index: GraphIndex, group: Group, n: int, stats: dict) -> tuple[list, bool] | None:
    """Per consumer of the group: its (N, B, M, K) view and the mean (N, B) and variance (N, B) of
    what it reads; and whether these come from statistics the graph holds (a BatchNormalization's,
    ``statistics.Stats.anchored``). Without such statistics every channel counts as unit variance
    and zero mean (its consumer's columns alone rank it). None for a grouped consumer."""
    out, anchored = [], True
    for c in group.consumers:
        if conv_groups(c.node) > 1:
            return None
        weight = index.array(c.weight)
        block = int(weight.shape[c.in_axis]) // n
        s = stats.get(c.node.input[0])
        if s is None or not s.anchored:
            s, anchored = Stats(np.zeros(n), np.ones(n)), False
        if len(s.mean) == n:
            mean, var = np.repeat(s.mean[:, None], block, 1), np.repeat(s.var[:, None], block, 1)
        elif len(s.mean) == n * block:
            mean, var = s.mean.reshape(n, block), s.var.reshape(n, block)
        else:
            return None
        out.append((c, np.asarray(consumer_view(weight, c, n, block), np.float64), mean, var))
    return (out, anchored) if out else None


def group_costs(moments: list) -> np.ndarray:
    """Expected squared error in the consumers' outputs of removing each channel, its mean restored."""
    return sum(removal_costs(var, np.square(view).sum(axis=(2, 3))).sum(axis=1) for _, view, _, var in moments)


def restore_means(index: GraphIndex, moments: list, kept: np.ndarray, n: int) -> None:
    """Each consumer's bias takes what the removed channels gave it on average."""
    removed = np.setdiff1d(np.arange(n), kept)
    for c, view, mean, _ in moments:
        delta = np.einsum("nbmk,nb->m", view[removed], mean[removed])
        add_consumer_bias(index, c, delta.astype(np.float64))


def prune_group(index: GraphIndex, group: Group, kept: np.ndarray, n: int,
                views: list[tuple[Group, np.ndarray, int]] = ()) -> None:
    for p in group.producers:
        take_channels(index, p.weight, kept, n, p.out_axis)
        if current_bias(p) is not None:
            take_channels(index, current_bias(p), kept, n, -1)
    for target, full, total in [(group, kept, n)] + list(views):
        _prune_readers(index, target, full, total)
    _write_split_sizes(index, list(views))


def private(index: GraphIndex, node: onnx.NodeProto, position: int) -> str:
    """The node's input ``position``, copied first when other nodes read the same initializer
    (the dynamo exporter shares equal constants, such as untrained BN statistics, across layers)."""
    name = node.input[position]
    if not index.shared_with(name, node):
        return name
    copy = index.unique_name(f"{name}_{node.name or node.output[0]}")
    index.add_initializer(copy, index.array(name).copy())
    node.input[position] = copy
    if name not in node.input:
        index.readers[name] = [r for r in index.readers[name] if r is not node]
    index.readers[copy].append(node)
    return copy


def grouped_columns(weight: np.ndarray, groups: int, kept: np.ndarray, n: int) -> np.ndarray:
    """A grouped conv's weight (O, n / groups, ...) reading only the ``kept`` of its ``n`` input
    channels (the same count in each group): output block j keeps block j's columns."""
    rows, width = weight.shape[0] // groups, n // groups
    parts = [weight[j * rows:(j + 1) * rows][:, kept[(kept >= j * width) & (kept < (j + 1) * width)] - j * width]
             for j in range(groups)]
    return np.concatenate(parts, axis=0)


def _prune_readers(index: GraphIndex, group: Group, kept: np.ndarray, n: int) -> None:
    """Everything in the space but its producers: depthwise convs, per-channel parameters,
    consumers (blocks of columns after a Flatten), Reshape constants; layers that also write a
    Concat output space (its ``driven`` producers)."""
    for p in group.driven:
        take_channels(index, p.weight, kept, n, p.out_axis)
        if current_bias(p) is not None:
            take_channels(index, current_bias(p), kept, n, -1)
    for node in group.depthwise:
        take_channels(index, private(index, node, 1), kept, n, 0)
        if len(node.input) > 2 and node.input[2]:
            take_channels(index, private(index, node, 2), kept, n, 0)
        set_attr(node, "group", len(kept))
    sliced = set()  # one node may read one initializer twice (BN's bias and mean, both zero, shared)
    for node, name in group.per_channel:
        name = private(index, node, list(node.input).index(name))
        if name in sliced:
            continue
        sliced.add(name)
        arr = index.array(name)
        index.set_array(name, np.take(arr, kept, axis=int(np.argmax(arr.shape))))
    for c in group.consumers:
        weight = index.array(c.weight)
        if conv_groups(c.node) > 1:
            index.set_array(c.weight, grouped_columns(weight, conv_groups(c.node), kept, n))
            continue
        block = int(weight.shape[c.in_axis]) // n
        pruned, _ = compensate_along(weight, c.in_axis, c.out_axis, Compensation.prune(n, kept), block)
        index.set_array(c.weight, pruned)
    for node in group.reshapes:
        shrink_reshape(index, node, n, len(kept))
    drop_value_info(index.model, group.tensors)


STATISTICS = tensor_statistics  # the data-free model of every tensor (a calibrated run may replace it)


@dataclass
class GroupPlan:
    """One group to prune: its producers' names, width, how many it keeps, the channels the
    data-free plan keeps, the spaces those reach through Concat/Split ranges, and what the
    data-free plan measured (the consumers' moments where it has them)."""

    group: Group
    names: list[str]
    channels: int
    n_keep: int
    kept: np.ndarray
    views: list
    moments: list | None = None
    anchored: bool = False
    predicted: float | None = None
    asked: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def readers(self) -> list:
        return self.group.consumers + [c for target, _, _ in self.views for c in target.consumers]

    def entry(self, kept: int, method: str = "") -> dict:
        """The report entry once the group keeps ``kept`` channels."""
        return {"layer": " + ".join(self.names), "op": "coupled group",
                "consumer": ", ".join(c.name for c in self.readers), "channels": self.channels, "kept": int(kept),
                "merged": 0, "regressed": 0, "pruned": int(self.channels - kept),
                "method": method or f"prune ({self.group.kind} group)" + (", means restored" if self.anchored else ""),
                "depthwise": [d.name for d in self.group.depthwise]}

    def apply(self, index: GraphIndex, opts) -> dict:
        """The data-free plan: prune (restoring the removed channels' means where BN statistics
        give them); the report entry."""
        if self.anchored:
            restore_means(index, self.moments, self.kept, self.channels)
        prune_group(index, self.group, self.kept, self.channels, self.views)
        entry = self.entry(self.n_keep)
        if self.predicted is not None:
            entry["predicted_error"] = round(self.predicted, 4)
            entry["model"] = "batchnorm statistics" if self.anchored else "consumer columns"
            if self.n_keep > self.asked:
                entry["asked_kept"] = int(self.asked)
                entry["note"] = (f"asked {self.asked} of {self.channels} kept; {self.n_keep} kept so that the predicted "
                                 f"error stays under --max-group-error {opts.max_group_error}")
        return entry


@dataclass
class GroupRanking:
    """How a group's channels are ranked for removal: by the consumers' moments where the
    data-free model has them (``costs``: each channel's predicted removal cost), else by the
    producers' weight norms (``scores``)."""

    blocks: int
    moments: list | None = None
    anchored: bool = False
    costs: np.ndarray | None = None
    scores: np.ndarray | None = None

    def kept(self, n_keep: int) -> np.ndarray:
        if self.costs is not None:
            return keep_least_costly(self.costs, n_keep, self.blocks)
        return select_per_block(self.scores, n_keep, self.blocks)


def candidate_groups(index: GraphIndex, opts, ctx, done: frozenset = frozenset()) -> Iterator[tuple[Group, list[str], int]]:
    """(group, its producers' names, its width) for every group that is no free chain and that
    these options allow to prune, whatever ratio it gets; each group left whole is recorded in
    ``ctx`` with its reason. ``done``: names of groups (their first producer's) already pruned."""
    chained = {c.producer.node.name for c in find_chains(index)[0]}
    for group in find_groups(index):
        names = [p.name for p in group.producers]
        if names[0] in done:
            continue
        if not group.coupled and len(names) == 1 and (group.producers[0].node.name in chained or group.blocked):
            continue  # a free chain (the merge pass's business), or one it said why not
        if not group.free and opts.coupled != "prune":
            ctx.skip(", ".join(names), f"residual stream left whole ({group.residual[0].op_type} "
                                       f"{group.residual[0].name!r} adds it; --coupled prune prunes it)"
                     if group.residual else "its channels reach a residual stream (--coupled prune prunes it)")
            continue
        if group.blocked:
            ctx.skip(", ".join(names), f"coupled group left whole: {group.blocked}")
            continue
        n = _channels(index, group)
        if isinstance(n, str):
            ctx.skip(", ".join(names), f"coupled group left whole: {n}")
            continue
        if any(r is None for r in group_ratios(opts, group)):
            ctx.skip(", ".join(names), "coupled group left whole: a member is excluded")
            continue
        if n % group.blocks:
            ctx.skip(", ".join(names), f"left whole: {n} channels do not fall in {group.blocks} equal conv groups")
            continue
        yield group, names, n


def group_names(group: Group) -> list[list[str]]:
    """What each producer of the group is known by (node name, weight, output)."""
    return [p.node.name and [p.node.name, p.weight, p.output] or [p.weight] for p in group.producers]


def group_ratios(opts, group: Group) -> list[float | None]:
    return [opts.ratio_for(names) for names in group_names(group)]


def rank_group(index: GraphIndex, group: Group, n: int, opts, stats_of) -> GroupRanking:
    """The group's ranking; ``stats_of()`` gives the data-free statistics (computed on first use)."""
    # residual streams (pruned on request only) keep the weight-norm ranking measured on ResNets
    if opts.method != "prune" and group.free and not group.views and not group.splits:
        found = consumer_moments(index, group, n, stats_of())
        if found is not None:
            return GroupRanking(group.blocks, *found, costs=group_costs(found[0]))
    return GroupRanking(group.blocks, scores=_scores(index, group, n, opts.plan_options("prune").criterion))


def plan_groups(index: GraphIndex, opts, ctx, done: frozenset = frozenset()) -> Iterator[GroupPlan]:
    """Every group that is no free chain and can be pruned, with the data-free plan's kept
    channels; each group left whole is recorded in ``ctx`` with its reason. Lazily: a group
    reached through a Concat is sized by its parts as pruned when it comes. ``done``: names
    of groups (their first producer's) already pruned, passed over."""
    stats_of = functools.cache(lambda: STATISTICS(index))  # computed when the first group needs them
    for group, names, n in candidate_groups(index, opts, ctx, done):
        op_type = group.producers[0].node.op_type
        ratio = min(group_ratios(opts, group))
        n_keep = opts.kept_channels(n, ratio, op_type, group.blocks)
        if n_keep >= n:
            why = opts.kept_whole_by_alignment(n, ratio, op_type, group.blocks)
            if why:
                ctx.skip(", ".join(names), f"coupled group left whole: {why}")
            continue
        ranking = rank_group(index, group, n, opts, stats_of)
        predicted = None
        asked = n_keep
        if ranking.costs is not None:
            costs = ranking.costs
            # calibration measures each group's error itself, and a budget measured it in allocating: the asked count, uncapped
            measured = getattr(opts, "calibration", None) is not None or getattr(opts, "allocated", None)
            cap = 1.0 if measured else opts.max_group_error
            n_keep = capped_keep(costs, n_keep, cap, opts.alignment(n, op_type, group.blocks)[0])
            if n_keep >= n:
                ctx.skip(", ".join(names), f"coupled group left whole: removing {n - asked} of {n} channels "
                         f"would cost {relative_error(costs, keep_least_costly(costs, asked)):.2f} of its "
                         f"consumers' output (predicted; --max-group-error {opts.max_group_error} allows less)")
                continue
            predicted = relative_error(costs, ranking.kept(n_keep))
        kept = ranking.kept(n_keep)
        views = _views(index, group, kept, n)
        if isinstance(views, str):
            ctx.skip(", ".join(names), f"coupled group left whole: {views}")
            continue
        yield GroupPlan(group, names, n, n_keep, kept, views, ranking.moments, ranking.anchored, predicted, asked)


class PruneCoupled:
    name = "prune-coupled"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        opts = ctx.options
        index = GraphIndex(model)
        changed = False
        for plan in plan_groups(index, opts, ctx, frozenset(ctx.groups_done)):
            entry = plan.apply(index, opts)
            if getattr(opts, "calibration", None) is not None:  # calibration took every other group
                entry["calibration"] = "not calibrated (its channels reach Concat or Split ranges): the data-free plan"
            ctx.report.setdefault("layers", []).append(entry)
            log.info("coupled group %s: %d -> %d channels", " + ".join(plan.names), plan.channels, plan.n_keep)
            changed = True
        return changed
