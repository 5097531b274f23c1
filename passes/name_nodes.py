"""Give every unnamed node a unique name, so logs, reports and globs can refer to it.

    Conv(x, w) -> y        becomes        Conv 'Conv_3'(x, w) -> y
"""

from __future__ import annotations

import onnx


class NameNodes:
    name = "name-nodes"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        taken = {n.name for n in model.graph.node if n.name}
        changed = False
        for i, node in enumerate(model.graph.node):
            if node.name:
                continue
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name, changed = name, True
            taken.add(name)
        return changed
