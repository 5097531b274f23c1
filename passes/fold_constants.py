"""Turn weights computed by constant subgraphs into initializers.

    Constant -> Identity -> Conv.W         becomes        initializer -> Conv.W
    ConstantOfShape(shape) -> Conv.B       becomes        initializer -> Conv.B

Exporters often emit these; the chain analysis only sees initializers.

Match: main-graph nodes that read only constants, are deterministic, and carry no subgraph.
If/Loop/Scan are never folded and their bodies are never touched (re-sorting them is how
onnx-graphsurgeon's folding broke silero-vad); a folded value a body reads from the outer
scope becomes an initializer, which bodies may read.
Check: every output's size is known from shape inference, before anything is computed, and
lies under the cap (``fold_max_elements`` / ``fold_max_mb``); a constant over the cap is
refused naming its node (onnxruntime would compute it on every run: a 2.5 KB file can ask for
gigabytes). Unknown sizes are left unfolded.
Rewrite: onnxruntime evaluates the folded nodes (the same kernels that verify the result);
the values later nodes or bodies read become initializers; initializers nothing reads go.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_merge.errors import ModelError
from onnx_merge.graph import GraphIndex, remove_at, subgraph_inputs
from onnx_merge.io import runtime_ir_version
from onnx_merge.options import CompressOptions
from onnx_merge.shapes import tensor_nbytes

log = logging.getLogger("onnx_merge")
PARAMETER_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "Add": (0, 1),
                    "BatchNormalization": (1, 2, 3, 4), "Reshape": (1,), "PRelu": (1,), "Pad": (1, 2)}
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
QUANTIZATION = {"QuantizeLinear", "DequantizeLinear"}  # QDQ weights are how a quantized model says so: kept
_SUBGRAPH = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_MAX_ROUNDS = 8  # a round folds what shape inference can size; folded shapes size the next round
_DATA_FOR_INFERENCE = 4096  # bytes: initializers up to this size go to shape inference with values


def computed_parameters(index: GraphIndex) -> list[str]:
    """Parameter inputs produced by nodes rather than stored as initializers."""
    names = []
    for node in index.graph.node:
        for i in PARAMETER_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in index.producer:
                names.append(node.input[i])
    return names


def constant_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes whose value is fixed: deterministic, no subgraph, reading only initializers and
    other such nodes, not producing a graph output. The graph is in topological order."""
    known = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    picked = []
    for node in graph.node:
        if (node.domain in ("", "ai.onnx") and node.op_type not in NONDETERMINISTIC | QUANTIZATION
                and not any(a.type in _SUBGRAPH for a in node.attribute)
                and all(i in known for i in node.input if i) and not any(o in outputs for o in node.output)):
            picked.append(node)
            known.update(o for o in node.output if o)
    return picked


def _mini_model(model: onnx.ModelProto, nodes, outputs, with_values) -> onnx.ModelProto:
    """The nodes alone, their initializer inputs as initializers (``with_values``: the small
    ones only, the rest as typed inputs: shape inference needs their shapes, not their data)."""
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o for n in nodes for o in n.output}
    read = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in produced))
    values, typed = [], []
    for name in read:
        t = inits[name]
        if with_values(t):
            values.append(t)
        else:
            typed.append(onnx.helper.make_tensor_value_info(name, t.data_type, t.dims))
    graph = onnx.helper.make_graph(list(nodes), "constants", typed, outputs, values)
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=runtime_ir_version(model))


def _sizes(model: onnx.ModelProto, nodes) -> dict[str, tuple[int, int] | None]:
    """Output name -> (elements, bytes) from shape inference; None where it cannot say."""
    names = [o for n in nodes for o in n.output if o]
    mini = _mini_model(model, nodes, [onnx.ValueInfoProto(name=n) for n in names],
                       lambda t: tensor_nbytes(t) <= _DATA_FOR_INFERENCE)
    try:
        inferred = onnx.shape_inference.infer_shapes(mini, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        log.info("constant folding: shape inference failed (%s); nothing folded", str(exc).splitlines()[0])
        return dict.fromkeys(names)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    sizes: dict[str, tuple[int, int] | None] = {}
    for name in names:
        t = types.get(name)
        tensor = t.tensor_type if t is not None and t.HasField("tensor_type") else None
        if tensor is None or not tensor.HasField("shape") or tensor.elem_type in (0, onnx.TensorProto.STRING) or \
                not all(d.HasField("dim_value") for d in tensor.shape.dim):
            sizes[name] = None
            continue
        elements = int(np.prod([d.dim_value for d in tensor.shape.dim], dtype=np.int64))
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
        sizes[name] = (elements, elements * itemsize)
    return sizes


def _check_cap(node: onnx.NodeProto, elements: int, nbytes: int, options: CompressOptions) -> None:
    max_bytes = options.fold_max_mb * 2**20
    if elements > options.fold_max_elements or nbytes > max_bytes:
        raise ModelError(f"node {node.name or node.output[0]!r} ({node.op_type}) computes a constant of "
                         f"{elements:,} elements ({nbytes / 2**20:,.0f} MiB), over the folding cap of "
                         f"{options.fold_max_elements:,} elements / {options.fold_max_mb:,.0f} MiB; onnxruntime "
                         "would compute it on every run. Raise --fold-max-elements / --fold-max-mb, or pass "
                         "--skip-fold to leave constants unfolded")


def _evaluate(model: onnx.ModelProto, nodes, names: list[str]) -> dict[str, np.ndarray] | None:
    from onnx_merge.runtime import make_session

    mini = _mini_model(model, nodes, [onnx.ValueInfoProto(name=n) for n in names], lambda t: True)
    try:
        session = make_session(mini.SerializeToString())
        return dict(zip(names, session.run(names, {})))
    except Exception as exc:  # onnxruntime's own error types: the original runs it; leave it unfolded
        log.info("constant folding: onnxruntime could not evaluate the constants (%s)", str(exc).splitlines()[0])
        return None


def check_constant_sizes(model: onnx.ModelProto, options: CompressOptions) -> None:
    """The cap check alone, nothing computed: run before onnxruntime first runs the original
    (which would compute every constant)."""
    candidates = constant_nodes(model.graph)
    sizes = _sizes(model, candidates) if candidates else {}
    for node in candidates:
        for o in node.output:
            if sizes.get(o) is not None:
                _check_cap(node, *sizes[o], options)


def fold_once(model: onnx.ModelProto, options: CompressOptions) -> int:
    """One round: fold the constant nodes whose sizes are known. Returns how many were folded."""
    graph = model.graph
    candidates = constant_nodes(graph)
    if not candidates:
        return 0
    sizes = _sizes(model, candidates)
    inits = {t.name for t in graph.initializer}
    folded, values = [], set(inits)
    for node in candidates:
        outs = [o for o in node.output if o]
        for o in outs:
            if sizes[o] is not None:
                _check_cap(node, *sizes[o], options)
        if all(sizes[o] is not None for o in outs) and all(i in values for i in node.input if i):
            folded.append(node)
            values.update(outs)
    if not folded:
        return 0
    folded_ids = {id(n) for n in folded}
    rest = [n for n in graph.node if id(n) not in folded_ids]
    in_bodies = set().union(*(subgraph_inputs(n) for n in rest))
    _share_repeats(folded, rest, in_bodies)
    read = {i for n in rest for i in n.input if i} | {o.name for o in graph.output} | in_bodies
    needed = [o for n in folded for o in n.output if o and o in read]
    results = _evaluate(model, folded, needed) if needed else {}
    if results is None:
        return 0
    remove_at(graph.node, [i for i, n in enumerate(graph.node) if id(n) in folded_ids])
    graph.initializer.extend(numpy_helper.from_array(np.asarray(results[name]), name) for name in needed)
    dropped = {i for n in folded for i in n.input if i in inits and i not in read}
    remove_at(graph.initializer, [i for i, t in enumerate(graph.initializer) if t.name in dropped])
    remove_at(graph.input, [i for i, v in enumerate(graph.input) if v.name in dropped])
    return len(folded)


def _share_repeats(folded: list[onnx.NodeProto], rest: list[onnx.NodeProto], in_bodies: set[str]) -> None:
    """Point the readers of a constant node that repeats an earlier one (same op, attributes and
    inputs) at the earlier one's outputs, and those of a constant Identity at its input, so that
    a value is stored once: a weight tied across layers (ALBERT's one encoder layer read by every
    layer) reaches each layer through an Identity or Transpose of its own, and folding each would
    store a copy per layer. Outputs a subgraph reads by name keep their own."""
    first: dict[bytes, onnx.NodeProto] = {}
    renamed: dict[str, str] = {}
    for node in folded:
        if node.op_type == "Identity" and node.input and not in_bodies.intersection(node.output):
            renamed[node.output[0]] = renamed.get(node.input[0], node.input[0])  # its input is the value
            continue
        key = onnx.NodeProto(op_type=node.op_type, domain=node.domain, input=[renamed.get(i, i) for i in node.input],
                             attribute=node.attribute).SerializeToString(deterministic=True)
        seen = first.setdefault(key, node)
        if seen is not node and not in_bodies.intersection(node.output):
            renamed.update((o, s) for o, s in zip(node.output, seen.output) if o and s)
    if renamed:
        for node in rest:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]


class FoldConstantWeights:
    name = "fold-constant-weights"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        options = ctx.options if isinstance(ctx.options, CompressOptions) else CompressOptions()
        if options.skip_fold:
            return False
        index = GraphIndex(model)
        if not computed_parameters(index) and not any(n.op_type == "Constant" for n in model.graph.node):
            return False
        before = len(model.graph.node)
        for _ in range(_MAX_ROUNDS):
            if not fold_once(model, options):
                break
        log.info("folded constant subgraphs: %d -> %d nodes", before, len(model.graph.node))
        return len(model.graph.node) != before
