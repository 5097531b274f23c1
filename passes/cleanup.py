"""Drop initializers nothing reads any more (left behind by folding)."""

from __future__ import annotations

import onnx

from onnx_merge.graph import GraphIndex


class RemoveUnused:
    name = "remove-unused"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        index = GraphIndex(model)
        keep = [t for t in model.graph.initializer if index.readers.get(t.name)]
        if len(keep) == len(model.graph.initializer):
            return False
        unused = {t.name for t in model.graph.initializer} - {t.name for t in keep}
        copies = [onnx.TensorProto() for _ in keep]
        for c, t in zip(copies, keep):
            c.CopyFrom(t)
        del model.graph.initializer[:]
        model.graph.initializer.extend(copies)
        inputs = [i for i in model.graph.input if i.name not in unused]
        if len(inputs) != len(model.graph.input):
            del model.graph.input[:]
            model.graph.input.extend(inputs)
        return True
