"""The numerical decisions of onnx-merge, on plain NumPy arrays (no ONNX)."""

from .batchnorm import BatchNorm
from .compensation import Compensation, compensate_consumer
from .criteria import CRITERIA, importance, keep_count, select_kept
from .merge import SCALE_RULES, merge_by_cosine, merge_through_bn
from .planner import BN_RULES, PlanOptions, ProducerArrays, plan_layer

__all__ = ["BN_RULES", "CRITERIA", "SCALE_RULES", "BatchNorm", "Compensation", "PlanOptions", "ProducerArrays",
           "compensate_consumer", "importance", "keep_count", "merge_by_cosine", "merge_through_bn", "plan_layer",
           "select_kept"]
