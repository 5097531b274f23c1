"""Graph rewrite passes, one per file. Each reads as match, check, rewrite."""

from .calibrate_consumers import CalibrateConsumers
from .cleanup import RemoveUnused
from .fold_batchnorm import FoldBatchNorm
from .fold_channel_affine import FoldChannelAffine
from .flatten_batch_reshape import FlattenBatchReshape
from .fold_constants import FoldConstantWeights
from .gemm_to_matmul import GemmToMatMul
from .merge_channels import MergeChannels
from .name_nodes import NameNodes
from .prune_coupled import PruneCoupled
from .prune_heads import PruneHeads
from .unshare_weights import ReshareCopies, UnshareWeights

__all__ = ["CalibrateConsumers", "FlattenBatchReshape", "FoldBatchNorm", "FoldChannelAffine", "FoldConstantWeights", "GemmToMatMul", "MergeChannels", "NameNodes", "PruneCoupled", "PruneHeads", "RemoveUnused",
           "ReshareCopies", "UnshareWeights"]
