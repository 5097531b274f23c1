"""The channel analysis, driven by the one op table (``onnx_merge.ops``).

- ``chains``: free chains, a producer whose channels reach one or more consumers through
  per-channel ops (composite units included): merged or pruned by ``passes/merge_channels``.
- ``spaces``: channel groups, union-find over channel spaces (depthwise convs, SE gates,
  grouped convs, Concat/Split index maps, residual streams): pruned consistently by
  ``passes/prune_coupled``.

A free chain is the group of a space with one producer and nothing that ties its channels
elsewhere; both ask the same table and decline with one ``Decline(reason)``.
"""

from ..ops import Decline
from .chains import (Branch, Chain, Layer, Rejected, Skip, activation_kind, channel_param_axis, describe_layer,
                     find_chains, nonnegative_axes, reduction_axes, trace_chain)
from .spaces import Group, SplitView, describe_group, find_groups, reached_spaces

__all__ = ["Branch", "Chain", "Decline", "Group", "Layer", "Rejected", "Skip", "SplitView", "activation_kind",
           "channel_param_axis", "describe_group", "describe_layer", "find_chains", "find_groups", "nonnegative_axes",
           "reached_spaces", "reduction_axes", "trace_chain"]
