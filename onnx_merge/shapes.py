"""Keeping shape annotations honest after a rewrite."""

from __future__ import annotations

import onnx


def drop_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove value_info entries of tensors whose shapes changed (they would be stale)."""
    keep = [v for v in model.graph.value_info if v.name not in names]
    if len(keep) != len(model.graph.value_info):
        copies = []
        for v in keep:
            c = onnx.ValueInfoProto()
            c.CopyFrom(v)
            copies.append(c)
        del model.graph.value_info[:]
        model.graph.value_info.extend(copies)
