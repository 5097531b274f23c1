"""Fuzzing the loader and the pass pipeline on mutated real models.

Whatever the input, `compress` ends with exit 0, 2 or 3, prints no traceback, leaves no
output behind on failure, never modifies its input, and anything it writes is a model
onnxruntime loads. FUZZ_EXAMPLES raises the number of cases (the `fuzz` benchmark target).
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_merge.cli import main
from tests.test_passes import conv_bn_relu_pool_conv

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
BASE = conv_bn_relu_pool_conv(with_bn=True).SerializeToString()
OPS = ["Relu", "Conv", "Add", "Concat", "Sigmoid", "Flatten", "Gemm", "MaxPool", "Identity", "Nonexistent"]


def _check(tmp_path, data: bytes, capsys) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    for p in (src, out, tmp_path / "out.onnx.data"):
        p.unlink(missing_ok=True)
    src.write_bytes(data)
    code = main(["compress", str(src), "-o", str(out), "--ratio", "0.5", "--no-verify"])
    err = capsys.readouterr().err
    assert code in (0, 2, 3), err
    assert "Traceback" not in err
    assert src.read_bytes() == data
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".onnx-merge-")]
    assert not leftovers
    if code == 0:
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    else:
        assert not out.exists() and len(err.strip().splitlines()) == 1


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(1, len(BASE))))
def test_byte_mutations(tmp_path_factory, capsys, edits, cut):
    data = bytearray(BASE)
    for pos, value in edits:
        data[pos] = value
    _check(tmp_path_factory.mktemp("bytes"), bytes(data[:cut] if cut else data), capsys)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["drop-node", "op", "input", "dims", "attr", "opset"]), pick=st.integers(0, 1000),
       value=st.integers(-3, 12))
def test_structural_mutations(tmp_path_factory, capsys, kind, pick, value):
    model = onnx.load_from_string(BASE)
    nodes, inits = model.graph.node, model.graph.initializer
    node = nodes[pick % len(nodes)]
    if kind == "drop-node":
        nodes.remove(node)
    elif kind == "op":
        node.op_type = OPS[pick % len(OPS)]
    elif kind == "input" and node.input:
        node.input[pick % len(node.input)] = [t.name for t in inits][value % len(inits)] if value % 2 else "missing"
    elif kind == "dims":
        tensor = inits[pick % len(inits)]
        dims = list(tensor.dims)
        dims[pick % len(dims)] = max(value, 0)
        del tensor.dims[:]
        tensor.dims.extend(dims)
    elif kind == "attr" and node.attribute:
        a = node.attribute[pick % len(node.attribute)]
        if a.ints:
            a.ints[pick % len(a.ints)] = value
        else:
            a.i = value
    elif kind == "opset":
        model.opset_import[0].version = value
    _check(tmp_path_factory.mktemp("struct"), model.SerializeToString(), capsys)


def test_unmutated_base_compresses(tmp_path, capsys):
    _check(tmp_path, BASE, capsys)
    assert (tmp_path / "out.onnx").exists()
    assert np.prod(onnx.load(tmp_path / "out.onnx").graph.initializer[0].dims) > 0
