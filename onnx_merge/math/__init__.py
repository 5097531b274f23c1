"""The numerical decisions of onnx-merge, on plain NumPy arrays (no ONNX)."""

from .batchnorm import BatchNorm
from .compensation import Compensation, compensate_consumer
from .criteria import CRITERIA, importance, keep_count, select_kept, select_per_block
from .merge import SCALE_RULES, merge_by_cosine, merge_through_bn
from .planner import BN_RULES, PlanOptions, ProducerArrays, plan_layer, rank_kept, ranks_by_criterion

__all__ = ["BN_RULES", "CRITERIA", "SCALE_RULES", "BatchNorm", "Compensation", "PlanOptions", "ProducerArrays",
           "compensate_consumer", "importance", "keep_count", "merge_by_cosine", "merge_through_bn", "plan_layer",
           "rank_kept", "ranks_by_criterion", "select_kept", "select_per_block"]
