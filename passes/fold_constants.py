"""Turn weights computed by constant subgraphs into initializers.

    Constant -> Identity -> Conv.W         becomes        initializer -> Conv.W
    ConstantOfShape(shape) -> Conv.B       becomes        initializer -> Conv.B

Exporters often emit these; the chain analysis only sees initializers. onnx-graphsurgeon's
constant folding evaluates the subgraphs with onnxruntime; the pass runs only when a
layer's parameter is not already an initializer.
"""

from __future__ import annotations

import logging

import onnx

from onnx_merge.graph import GraphIndex
from onnx_merge.io import runtime_ir_version

log = logging.getLogger("onnx_merge")
PARAMETER_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "Add": (0, 1),
                    "BatchNormalization": (1, 2, 3, 4), "Reshape": (1,), "PRelu": (1,), "Pad": (1, 2)}


def computed_parameters(index: GraphIndex) -> list[str]:
    """Parameter inputs produced by nodes rather than stored as initializers."""
    names = []
    for node in index.graph.node:
        for i in PARAMETER_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in index.producer:
                names.append(node.input[i])
    return names


class FoldConstantWeights:
    name = "fold-constant-weights"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        index = GraphIndex(model)
        if not computed_parameters(index) and not any(n.op_type == "Constant" for n in model.graph.node):
            return False
        import onnx_graphsurgeon as gs

        before = len(model.graph.node)
        model.ir_version = runtime_ir_version(model)  # graphsurgeon runs the subgraphs in onnxruntime
        graph = gs.import_onnx(model)
        graph.fold_constants(error_ok=True).cleanup().toposort()
        folded = gs.export_onnx(graph, do_type_check=False)
        folded.ir_version = model.ir_version
        del folded.opset_import[:]
        folded.opset_import.extend(model.opset_import)
        model.CopyFrom(folded)
        log.info("folded constant subgraphs: %d -> %d nodes", before, len(model.graph.node))
        return len(model.graph.node) != before
