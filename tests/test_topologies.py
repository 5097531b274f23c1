"""Topologies the one channel analysis reaches by default: composite activations, fan-outs,
depthwise blocks with SE gates. Each pruned model must equal the original with the removed
channels zeroed; exact duplicates must merge exactly."""

import numpy as np
import onnx
import pytest

from onnx_merge import CompressOptions, compress, inspect_model
from onnx_merge.graph import GraphIndex
from onnx_merge.groups import find_chains
from onnx_merge.ops import OPS, match_unit
from tests.helpers import initializer_shapes, run
from tests.test_coupled import _as_zeroed_rows
from tests.test_passes import make, x

RNG = np.random.default_rng(17)
S = {"half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32), "three": np.array(3.0, np.float32),
     "six": np.array(6.0, np.float32), "zero": np.array(0.0, np.float32), "rt2": np.array(np.sqrt(2), np.float32),
     "c": np.array(0.044715, np.float32), "k": np.array(np.sqrt(2 / np.pi), np.float32),
     "beta": np.array(1.702, np.float32)}

# h -> a: every way exporters write these activations
FORMS = {
    "silu": ("s = Sigmoid (h)\n a = Mul (h, s)", ("silu", {})),
    "silu-scaled": ("u = Mul (h, beta)\n s = Sigmoid (u)\n a = Mul (h, s)", ("silu", {"beta": 1.702})),
    "hard_swish-op": ("a = HardSwish (h)", ("hard_swish", {})),
    "hard_swish-hardsigmoid": ("s = HardSigmoid <alpha = 0.16666667, beta = 0.5> (h)\n a = Mul (h, s)",
                               ("hard_swish", {})),
    "hard_swish-clip": ("p = Add (h, three)\n q = Clip (p, zero, six)\n m = Mul (h, q)\n a = Div (m, six)",
                        ("hard_swish", {})),
    "gelu-erf": ("d = Div (h, rt2)\n e = Erf (d)\n f = Add (e, one)\n m = Mul (h, f)\n a = Mul (m, half)",
                 ("gelu", {})),
    "gelu-tanh": ("p = Pow (h, three)\n q = Mul (p, c)\n r = Add (h, q)\n t = Mul (r, k)\n u = Tanh (t)\n"
                  " v = Add (u, one)\n m = Mul (h, v)\n a = Mul (m, half)", ("gelu_tanh", {})),
    "gelu-op": ("a = Gelu (h)", ("gelu", {})),
    "mish": ("s = Softplus (h)\n t = Tanh (s)\n a = Mul (h, t)", ("mish", {})),
    "relu6": ("a = Clip (h, zero, six)", ("clip", {"min": 0.0, "max": 6.0})),
}


def _consts(body):
    return {k: v for k, v in S.items() if f"{k})" in body or f"{k}," in body}


def _conv_act_conv(form):
    body = FORMS[form][0]
    ws = {"w1": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) / 5,
          "w2": RNG.standard_normal((4, 8, 3, 3)).astype(np.float32) / 8} | _consts(body)
    text = (f"h = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)\n {body}\n"
            "y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a, w2)")
    return make(text, "float[1, 3, 6, 6] x", "float[1, 4, 6, 6] y", ws, opset=20 if form == "gelu-op" else 17)


@pytest.mark.parametrize("form", FORMS)
def test_composite_activation_is_one_named_unit_and_is_pruned_exactly(form):
    model = _conv_act_conv(form)
    chains, skips = find_chains(GraphIndex(model))
    assert not skips[:1] or skips[0].node != "Conv_0", skips
    chain = next(c for c in chains if c.producer.weight == "w1")
    assert chain.activation == FORMS[form][1] and not chain.mergeable
    assert "positively homogeneous" in chain.why_not_merge
    small, rep = compress(model, CompressOptions(ratio=0.5))
    assert initializer_shapes(small)["w1"] == (4, 3, 3, 3) and rep["layers"][0]["merged"] == 0
    feeds = x(1, 3, 6, 6)
    # every form maps 0 to 0: a removed channel is a zeroed one
    assert np.allclose(run(small, feeds)[0], run(_as_zeroed_rows(model, small, {"w1"}), feeds)[0], atol=1e-5)


def test_a_unit_read_by_something_else_is_no_unit():
    """h * Sigmoid(h) where h also meets the graph input at an Add: the channels are coupled
    (h + silu(h) alone would be one function of h, a unit)."""
    ws = {"w1": RNG.standard_normal((4, 4, 1, 1)).astype(np.float32)}
    model = make("h = Conv <kernel_shape = [1, 1]> (x, w1)\n s = Sigmoid (h)\n a = Mul (h, s)\n t = Add (h, x)\n y = Add (a, t)",
                 "float[1, 4, 3, 3] x", "float[1, 4, 3, 3] y", ws)
    index = GraphIndex(model)
    assert match_unit(index, "h") is None


def test_every_activation_in_the_table_has_a_name_or_none_and_a_function():
    for op, rule in OPS.items():
        if rule.kind == "per-channel" and not rule.spatial and op not in ("BatchNormalization",
                                                                           "InstanceNormalization"):
            assert rule.fn is not None, op


def _ffn(act_body):
    """(N, T, C) MatMul+Add -> activation -> MatMul+Add, channels on the last axis."""
    ws = {"w1": RNG.standard_normal((6, 8)).astype(np.float32) / 3, "b1": RNG.standard_normal(8).astype(np.float32),
          "w2": RNG.standard_normal((8, 6)).astype(np.float32) / 3, "b2": RNG.standard_normal(6).astype(np.float32)}
    ws["w1"][:, 7], ws["b1"][7] = 2.0 * ws["w1"][:, 1], 2.0 * ws["b1"][1]  # a planted positive multiple
    body = f"m1 = MatMul (x, w1)\n h = Add (m1, b1)\n {act_body}\n n = MatMul (a, w2)\n y = Add (n, b2)"
    return make(body, "float[2, 5, 6] x", "float[2, 5, 6] y", ws | _consts(act_body))


def test_rank3_matmul_ffn_with_gelu_is_compressed_and_relu_merges_exactly():
    gelu, _ = compress(_ffn(FORMS["gelu-erf"][0]), CompressOptions(ratio=0.25))
    assert initializer_shapes(gelu)["w1"] == (6, 6) and initializer_shapes(gelu)["w2"] == (6, 6)
    model = _ffn("a = Relu (h)")
    small, rep = compress(model, CompressOptions(ratio=1 / 8, method="merge"))
    assert rep["layers"][0]["merged"] == 1
    feeds = {"x": RNG.standard_normal((2, 5, 6)).astype(np.float32)}
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], atol=1e-5)


def _fire(bn_per_reader=False):
    """SqueezeNet's fire module: one squeeze conv read by two expand convs."""
    ws = {"sq": RNG.standard_normal((6, 8, 1, 1)).astype(np.float32) / 3,
          "e1": RNG.standard_normal((5, 6, 1, 1)).astype(np.float32) / 3,
          "e3": RNG.standard_normal((5, 6, 3, 3)).astype(np.float32) / 6}
    ws["sq"][5] = 0.5 * ws["sq"][2]  # a planted positive multiple: merges exactly into both readers
    lines = ["s = Conv <kernel_shape = [1, 1]> (x, sq)", "r = Relu (s)"]
    if bn_per_reader:
        for n in ("n1", "n3"):
            ws |= {f"{n}_g": RNG.uniform(.5, 1.5, 6).astype(np.float32), f"{n}_b": RNG.normal(0, .1, 6).astype(np.float32),
                   f"{n}_m": RNG.normal(0, .1, 6).astype(np.float32), f"{n}_v": RNG.uniform(.5, 1.5, 6).astype(np.float32)}
        lines += ["r1 = BatchNormalization (r, n1_g, n1_b, n1_m, n1_v)", "r3 = BatchNormalization (r, n3_g, n3_b, n3_m, n3_v)"]
    else:
        lines += ["r1 = Identity (r)", "r3 = MaxPool <kernel_shape = [1, 1]> (r)"]
    lines += ["a = Conv <kernel_shape = [1, 1]> (r1, e1)", "b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r3, e3)",
              "ar = Relu (a)", "br = Relu (b)", "y = Concat <axis = 1> (ar, br)"]
    return make("\n".join(lines), "float[1, 8, 5, 5] x", "float[1, 10, 5, 5] y", ws)


def test_fan_out_merges_duplicates_exactly_into_every_consumer():
    model = _fire()
    small, rep = compress(model, CompressOptions(ratio=1 / 6, method="merge", exclude=["e1", "e3"]))
    entry = next(e for e in rep["layers"] if e["layer"] == "Conv_0")
    assert entry["merged"] == 1 and entry["consumer"].count("Conv") == 2
    dims = initializer_shapes(small)
    assert dims["sq"][0] == dims["e1"][1] == dims["e3"][1] == 5
    feeds = x(1, 8, 5, 5)
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], atol=1e-5)
    info = inspect_model(model)
    assert next(c for c in info["chains"] if c["layer"] == "Conv_0")["path"] == ["Relu", "Identity", "MaxPool"]


def test_fan_out_with_a_bn_per_reader_is_pruned_with_each_bn():
    model = _fire(bn_per_reader=True)
    small, rep = compress(model, CompressOptions(ratio=0.5, exclude=["e1", "e3"], fold_bn=False))
    entry = next(e for e in rep["layers"] if e["layer"] == "Conv_0")
    assert entry["merged"] == 0 and "affine" in entry["note"]
    dims = initializer_shapes(small)
    assert dims["sq"][0] == 3 and dims["n1_g"] == dims["n3_v"] == (3,) and dims["e3"][1] == 3
    assert run(small, x(1, 8, 5, 5))[0].shape == (1, 10, 5, 5)


def _inverted_residual_with_se(gate="Sigmoid"):
    """expand -> relu -> depthwise -> relu -> SE -> project: one group, pruned by default."""
    w = {"ex": (12, 4, 1, 1), "dw": (12, 1, 3, 3), "r": (3, 12, 1, 1), "rb": (3,), "e": (12, 3, 1, 1), "eb": (12,),
         "pj": (4, 12, 1, 1)}
    ws = {k: (RNG.standard_normal(s) / 3).astype(np.float32) for k, s in w.items()}
    act = "g = Sigmoid (eo)" if gate == "Sigmoid" else "g = HardSigmoid <alpha = 0.16666667, beta = 0.5> (eo)"
    body = "\n".join([
        "a = Conv <kernel_shape = [1, 1]> (x, ex)", "ar = Relu (a)",
        "d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 12> (ar, dw)", "dr = Relu (d)",
        "p = GlobalAveragePool (dr)", "ro = Conv <kernel_shape = [1, 1]> (p, r, rb)", "rr = Relu (ro)",
        "eo = Conv <kernel_shape = [1, 1]> (rr, e, eb)", act, "m = Mul (dr, g)" if gate == "Sigmoid" else "m = Mul (g, dr)",
        "y = Conv <kernel_shape = [1, 1]> (m, pj)"])
    return make(body, "float[1, 4, 6, 6] x", "float[1, 4, 6, 6] y", ws)


@pytest.mark.parametrize("gate", ["Sigmoid", "HardSigmoid"])
def test_depthwise_block_with_se_gate_is_one_group_pruned_by_default(gate):
    # random weights: every channel counts alike, so the default --max-group-error would keep more
    model = _inverted_residual_with_se(gate)
    small, rep = compress(model, CompressOptions(ratio=0.5, exclude=["r", "ro"], max_group_error=1.0))
    dims = initializer_shapes(small)
    assert dims["ex"][0] == dims["dw"][0] == dims["r"][1] == dims["e"][0] == dims["eb"][0] == dims["pj"][1] == 6
    assert dims["r"][0] == 3  # the SE's hidden layer is a group of its own (excluded here)
    dw = next(n for n in small.graph.node if list(n.input[1:2]) == ["dw"])
    assert next(a.i for a in dw.attribute if a.name == "group") == 6
    feeds = x(1, 4, 6, 6)
    assert np.allclose(run(small, feeds)[0], run(_as_zeroed_rows(model, small, {"ex"}), feeds)[0], atol=1e-5)
    group = next(g for g in inspect_model(model)["groups"] if g["depthwise"])
    assert group["kind"] == "depthwise" and group["left_whole"] is None and len(group["producers"]) == 2
    hidden, _ = compress(model, CompressOptions(ratio=0.34))
    assert initializer_shapes(hidden)["r"][0] < 3  # and it is compressed too


def test_residual_sum_of_two_concats_is_refused_not_half_pruned():
    """MixNet's mixed convs: Concat(a, b) + Concat(c, d). Pruning one Concat's ranges while the
    other addend stays whole would fail the checker; the group is refused with a reason."""
    w = {k: (RNG.standard_normal((4, 8, 1, 1)) / 3).astype(np.float32) for k in ("wa", "wb", "wc", "wd")}
    w["head"] = (RNG.standard_normal((3, 8, 1, 1)) / 3).astype(np.float32)
    body = "\n".join([f"{t} = Conv <kernel_shape = [1, 1]> (x, w{t})" for t in "abcd"] + [
        "p = Concat <axis = 1> (a, b)", "q = Concat <axis = 1> (c, d)", "s = Add (p, q)", "r = Relu (s)",
        "y = Conv <kernel_shape = [1, 1]> (r, head)"])
    model = make(body, "float[1, 8, 4, 4] x", "float[1, 3, 4, 4] y", w)
    for coupled in ("skip", "prune"):
        small, rep = compress(model, CompressOptions(ratio=0.5, coupled=coupled))
        onnx.checker.check_model(small, full_check=True)
        assert initializer_shapes(small)["wa"] == (4, 8, 1, 1)
        assert run(small, x(1, 8, 4, 4))[0].shape == (1, 3, 4, 4)
    assert any("also written by Concat" in s["reason"] for s in rep["skipped"])


def test_grouped_conv_is_pruned_equally_per_group_on_both_sides():
    """conv_a -> relu -> grouped conv (4 groups) -> relu -> conv_c: both spaces lose the same
    count in every group, and the pruned model is the original with those channels zeroed."""
    ws = {"wa": RNG.standard_normal((16, 3, 1, 1)).astype(np.float32) / 2,
          "wb": RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) / 4,
          "wc": RNG.standard_normal((5, 8, 1, 1)).astype(np.float32) / 3}
    body = "\n".join(["a = Conv <kernel_shape = [1, 1]> (x, wa)", "ar = Relu (a)",
                      "b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 4> (ar, wb)", "br = Relu (b)",
                      "y = Conv <kernel_shape = [1, 1]> (br, wc)"])
    model = make(body, "float[1, 3, 5, 5] x", "float[1, 5, 5, 5] y", ws)
    feeds = x(1, 3, 5, 5)
    only_a, rep = compress(model, CompressOptions(round_to=1, ratio=0.5, exclude=["wb"], max_group_error=1.0))
    dims = initializer_shapes(only_a)
    assert dims["wa"][0] == 8 and dims["wb"] == (8, 2, 3, 3)
    kept = [i for i, row in enumerate(onnx.numpy_helper.to_array(model.graph.initializer[0]))
            if any(np.array_equal(row, k) for k in onnx.numpy_helper.to_array(only_a.graph.initializer[0]))]
    assert [sum(1 for i in kept if i // 4 == j) for j in range(4)] == [2, 2, 2, 2]
    assert np.allclose(run(only_a, feeds)[0], run(_as_zeroed_rows(model, only_a, {"wa"}), feeds)[0], atol=1e-5)
    only_b, _ = compress(model, CompressOptions(round_to=1, ratio=0.5, exclude=["wa"], max_group_error=1.0))
    assert initializer_shapes(only_b)["wb"] == (4, 4, 3, 3) and initializer_shapes(only_b)["wc"] == (5, 4, 1, 1)
    assert np.allclose(run(only_b, feeds)[0], run(_as_zeroed_rows(model, only_b, {"wb"}), feeds)[0], atol=1e-5)
    assert next(g for g in inspect_model(model)["groups"] if "Conv_0" in g["producers"])["kind"] == "grouped"


def test_bn_parameters_shared_across_groups_are_copied_before_slicing():
    """The dynamo exporter shares equal constants: untrained BNs read one zeros and one ones
    initializer, a BN even reads the zeros as bias and mean. Each group slices its own copy."""
    ws = {"w1": RNG.standard_normal((8, 3, 1, 1)).astype(np.float32), "dw": RNG.standard_normal((8, 1, 3, 3)).astype(np.float32),
          "w2": RNG.standard_normal((8, 8, 1, 1)).astype(np.float32), "dw2": RNG.standard_normal((8, 1, 3, 3)).astype(np.float32),
          "w3": RNG.standard_normal((4, 8, 1, 1)).astype(np.float32),
          "zeros": np.zeros(8, np.float32), "ones": np.ones(8, np.float32)}
    body = "\n".join([
        "a = Conv <kernel_shape = [1, 1]> (x, w1)", "an = BatchNormalization (a, ones, zeros, zeros, ones)",
        "d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (an, dw)", "dr = Relu (d)",
        "b = Conv <kernel_shape = [1, 1]> (dr, w2)", "bn = BatchNormalization (b, ones, zeros, zeros, ones)",
        "e = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (bn, dw2)", "er = Relu (e)",
        "y = Conv <kernel_shape = [1, 1]> (er, w3)"])
    model = make(body, "float[1, 3, 5, 5] x", "float[1, 4, 5, 5] y", ws)
    small, _ = compress(model, CompressOptions(ratio=0.5, fold_bn=False, max_group_error=1.0))
    onnx.checker.check_model(small, full_check=True)
    dims = initializer_shapes(small)
    assert dims["w1"][0] == dims["w2"][0] == 4 and dims["w2"][1] == dims["w3"][1] == 4
    assert sum(1 for n in dims if n.startswith(("zeros", "ones"))) >= 4
    assert run(small, x(1, 3, 5, 5))[0].shape == (1, 4, 5, 5)


def test_a_layer_whose_weight_has_the_wrong_rank_is_declined_with_its_shape():
    from onnx_merge.graph import GraphIndex
    from onnx_merge.groups import Decline, describe_layer

    w = onnx.numpy_helper.from_array(np.ones((4,), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])], [w])
    index = GraphIndex(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    with pytest.raises(Decline, match=r"shape \[4\]"):
        describe_layer(index, index.graph.node[0])
