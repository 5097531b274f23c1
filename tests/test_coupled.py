"""Coupled channel groups pruned consistently (--coupled prune)."""

import numpy as np
import onnx
import pytest

from onnx_merge import CompressOptions, compress
from tests.helpers import initializer_shapes, run
from tests.test_passes import make, x

RNG = np.random.default_rng(7)


def _bn(name, c):
    return {f"{name}_g": RNG.uniform(0.5, 1.5, c).astype(np.float32), f"{name}_b": RNG.normal(0, .1, c).astype(np.float32),
            f"{name}_m": RNG.normal(0, .1, c).astype(np.float32), f"{name}_v": RNG.uniform(.5, 1.5, c).astype(np.float32)}


def _w(*shape):
    return (RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _bnode(inp, out, name):
    return f"{out} = BatchNormalization ({inp}, {name}_g, {name}_b, {name}_m, {name}_v)"


def bottleneck_net(blocks=2, width=16, inner=8):
    ws = {"stem": _w(width, 3, 3, 3), **_bn("sbn", width), "fc": _w(10, width)}
    lines = ['s = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, stem)', _bnode("s", "sb", "sbn"),
             "h0 = Relu (sb)"]
    for i in range(blocks):
        ws |= {f"a{i}": _w(inner, width, 1, 1), f"b{i}": _w(inner, inner, 3, 3), f"c{i}": _w(width, inner, 1, 1)}
        ws |= _bn(f"abn{i}", inner) | _bn(f"bbn{i}", inner) | _bn(f"cbn{i}", width)
        lines += [f"a{i}o = Conv <kernel_shape = [1, 1]> (h{i}, a{i})", _bnode(f"a{i}o", f"a{i}n", f"abn{i}"),
                  f"a{i}r = Relu (a{i}n)",
                  f"b{i}o = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a{i}r, b{i})",
                  _bnode(f"b{i}o", f"b{i}n", f"bbn{i}"), f"b{i}r = Relu (b{i}n)",
                  f"c{i}o = Conv <kernel_shape = [1, 1]> (b{i}r, c{i})", _bnode(f"c{i}o", f"c{i}n", f"cbn{i}"),
                  f"s{i} = Add (c{i}n, h{i})", f"h{i + 1} = Relu (s{i})"]
    lines += [f"p = GlobalAveragePool (h{blocks})", "f = Flatten <axis = 1> (p)", "y = Gemm <transB = 1> (f, fc)"]
    return make("\n".join(lines), "float[2, 3, 8, 8] x", "float[2, 10] y", ws)


def _out_channels(model):
    dims = initializer_shapes(model)
    return {n.name or n.output[0]: dims[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}, dims


def test_bottleneck_residual_group_is_pruned_consistently():
    model = bottleneck_net()
    small, rep = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune"))
    onnx.checker.check_model(small, full_check=True)
    _, dims = _out_channels(small)
    assert dims["stem"][0] == dims["c0"][0] == dims["c1"][0] == 11  # floor(16 * 0.7)
    assert dims["a0"][1] == dims["a1"][1] == dims["fc"][1] == 11
    kept_bn, _ = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune", fold_bn=False))
    bn_dims = initializer_shapes(kept_bn)
    assert bn_dims["cbn0_g"] == bn_dims["sbn_v"] == bn_dims["cbn1_m"] == (11,)
    assert np.allclose(run(kept_bn, x(2, 3, 8, 8))[0].shape, (2, 10))
    assert dims["a0"][0] == 5 and dims["b0"] == (5, 5, 3, 3)  # inner chains: floor(8 * 0.7)
    assert rep["params_after"] < rep["params_before"]
    assert run(small, x(2, 3, 8, 8))[0].shape == (2, 10)
    skipped, _ = compress(model, CompressOptions(round_to=1, ratio=0.3))
    assert _out_channels(skipped)[1]["stem"][0] == 16  # default: coupled channels stay whole
    # a group is pruned, never merged: merge-cost, a set choice for merges, ranks it by l1-norm
    by_set, _ = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune", criterion="merge-cost"))
    by_l1, _ = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune", criterion="l1-norm"))
    weights = [{t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer} for m in (by_set, by_l1)]
    assert weights[0]["stem"].shape[0] == 11 and np.array_equal(weights[0]["stem"], weights[1]["stem"])


def test_depthwise_block_prunes_group_count():
    ws = {"w1": _w(8, 4, 1, 1), **_bn("n1", 8), "dw": _w(8, 1, 3, 3), **_bn("n2", 8), "w3": _w(6, 8, 1, 1)}
    body = "\n".join(["a = Conv <kernel_shape = [1, 1]> (x, w1)", _bnode("a", "an", "n1"), "ar = Relu (an)",
                      "d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (ar, dw)",
                      _bnode("d", "dn", "n2"), "dr = Relu (dn)", "y = Conv <kernel_shape = [1, 1]> (dr, w3)"])
    model = make(body, "float[1, 4, 6, 6] x", "float[1, 6, 6, 6] y", ws)
    # random weights: every channel matters alike, so the default --max-group-error would keep more
    small, rep = compress(model, CompressOptions(round_to=1, ratio=0.5, coupled="prune", max_group_error=1.0))
    dims = initializer_shapes(small)
    assert dims["w1"] == (4, 4, 1, 1) and dims["dw"] == (4, 1, 3, 3) and dims["w3"] == (6, 4, 1, 1)
    dw = next(n for n in small.graph.node if list(n.input[1:2]) == ["dw"])
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    assert run(small, x(1, 4, 6, 6))[0].shape == (1, 6, 6, 6)


def test_a_group_its_rounding_keeps_whole_says_so():
    ws = {"w1": _w(32, 4, 1, 1), "dw": _w(32, 1, 3, 3), "w3": _w(6, 32, 1, 1)}
    body = "\n".join(["a = Conv <kernel_shape = [1, 1]> (x, w1)", "ar = Relu (a)",
                      "d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 32> (ar, dw)",
                      "dr = Relu (d)", "y = Conv <kernel_shape = [1, 1]> (dr, w3)"])
    model = make(body, "float[1, 4, 6, 6] x", "float[1, 6, 6, 6] y", ws)
    small, rep = compress(model, CompressOptions(round_to=16, ratio=0.3, coupled="prune", max_group_error=1.0))
    assert initializer_shapes(small)["dw"] == (32, 1, 3, 3)
    assert any("22 of 32 channels rounded up to a multiple of 16 is all of them" in s["reason"]
               for s in rep["skipped"])
    pruned, _ = compress(model, CompressOptions(round_to=8, ratio=0.3, coupled="prune", max_group_error=1.0))
    assert initializer_shapes(pruned)["dw"] == (24, 1, 3, 3)
    chain = make("a = Conv <kernel_shape = [1, 1]> (x, w1)\nar = Relu (a)\ny = Conv <kernel_shape = [1, 1]> (ar, w3)",
                 "float[1, 4, 6, 6] x", "float[1, 6, 6, 6] y", {"w1": ws["w1"], "w3": ws["w3"]})
    _, rep = compress(chain, CompressOptions(round_to=16, ratio=0.3))
    assert {"node": "Conv_0", "reason": "left whole: 22 of 32 channels rounded up to a multiple of 16 is all of them "
            "(--round-to 1 keeps exact counts)"} in rep["skipped"]


def test_option_a_shortcuts_are_refused_with_a_reason(resnet20_weights):
    from onnx_merge.models.resnet import resnet_akamaster

    model = resnet_akamaster(resnet20_weights, fold=True)
    small, rep = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune"))
    onnx.checker.check_model(small, full_check=True)
    reasons = " ".join(s["reason"] for s in rep["skipped"])
    assert "Slice" in reasons or "Pad" in reasons
    assert run(small, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)


def _compresses(model, shape, **kw):
    small, rep = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune", **kw))
    onnx.checker.check_model(small, full_check=True)
    assert rep["params_after"] < rep["params_before"]
    feeds = x(*shape)
    assert [o.shape for o in run(small, feeds)] == [o.shape for o in run(model, feeds)]
    return small, rep


def _as_zeroed_rows(model, small, names):
    """The original model with the output rows that ``small`` dropped from ``names`` set to
    zero: for bias-free convs followed by ReLU, the same function as removing them."""
    new = {t.name: onnx.numpy_helper.to_array(t) for t in small.graph.initializer}
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for t in zeroed.graph.initializer:
        if t.name in names:
            w = onnx.numpy_helper.to_array(t).copy()
            kept = [i for i, row in enumerate(w) if any(np.array_equal(row, k) for k in new[t.name])]
            assert len(kept) == len(new[t.name])
            w[np.setdiff1d(np.arange(len(w)), kept)] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    return zeroed


def test_fire_module_with_concat_prunes_each_branch_and_its_column_range():
    ws = {"sq": _w(8, 16, 1, 1), "e1": _w(16, 8, 1, 1), "e3": _w(16, 8, 3, 3), "head": _w(10, 32, 1, 1)}
    body = """s = Conv <kernel_shape = [1, 1]> (x, sq)
        sr = Relu (s)
        a = Conv <kernel_shape = [1, 1]> (sr, e1)
        b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (sr, e3)
        ar = Relu (a)
        br = Relu (b)
        c = Concat <axis = 1> (ar, br)
        h = Conv <kernel_shape = [1, 1]> (c, head)
        p = GlobalAveragePool (h)
        y = Flatten <axis = 1> (p)"""
    model = make(body, "float[1, 16, 6, 6] x", "float[1, 10] y", ws)
    small, rep = _compresses(model, (1, 16, 6, 6), exclude=["sq"])
    dims = initializer_shapes(small)
    assert dims["e1"][0] == dims["e3"][0] == 11 and dims["head"][1] == 22
    # head lost exactly the columns of the branch channels that went: same function as
    # zeroing those channels in the original
    feeds = x(1, 16, 6, 6)
    expected = run(_as_zeroed_rows(model, small, {"e1", "e3"}), feeds)[0]
    assert np.allclose(run(small, feeds)[0], expected, atol=1e-5)


def test_dense_block_and_vgg_head_with_dropout_and_softmax():
    ws = {"b1": _w(16, 8, 1, 1), **_bn("n1", 16), "c1": _w(4, 16, 3, 3), "fc1": _w(12, 12 * 16), "fc2": _w(5, 12)}
    body = "\n".join([
        "h = Conv <kernel_shape = [1, 1]> (x, b1)", _bnode("h", "hn", "n1"), "hr = Relu (hn)",
        "g = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (hr, c1)",
        "d = Concat <axis = 1> (x, g)",
        "f = Flatten <axis = 1> (d)", "l = Gemm <transB = 1> (f, fc1)", "lr = Relu (l)", "dr = Dropout (lr)",
        "o = Gemm <transB = 1> (dr, fc2)", "y = Softmax <axis = 1> (o)"])
    model = make(body, "float[2, 8, 4, 4] x", "float[2, 5] y", ws)
    small, rep = _compresses(model, (2, 8, 4, 4))
    dims = initializer_shapes(small)
    assert dims["b1"][0] == 11 and dims["fc1"][0] == 8 and dims["fc2"][1] == 8
    # the new layer's channels sit after the 8 input channels in the concat: fc1 loses
    # their blocks of 16 flattened features, at that offset
    assert dims["c1"][0] == 2 and dims["fc1"][1] == (8 + 2) * 16
    only_c1, _ = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune", exclude=["b1", "fc1"]))
    feeds = x(2, 8, 4, 4)
    expected = run(_as_zeroed_rows(model, only_c1, {"c1"}), feeds)[0]
    assert np.allclose(run(only_c1, feeds)[0], expected, atol=1e-5)


def test_inspect_lists_groups_and_why_they_are_whole():
    from onnx_merge import inspect_model

    info = inspect_model(bottleneck_net())
    residual = next(g for g in info["groups"] if "stem" in " ".join(g["producers"]) or len(g["producers"]) == 3)
    assert len(residual["producers"]) == 3 and residual["channels"] == 16 and residual["left_whole"] is None
    assert residual["params_per_channel"] > 0
    assert all(len(g["consumers"]) > 0 for g in info["groups"])  # a lone output layer is no group


def test_inspect_says_why_option_a_groups_stay_whole(resnet20_weights):
    from onnx_merge import inspect_model
    from onnx_merge.models.resnet import resnet_akamaster

    info = inspect_model(resnet_akamaster(resnet20_weights, fold=True))
    reasons = [g["left_whole"] for g in info["groups"] if g["left_whole"]]
    assert reasons and all("Slice" in r or "Pad" in r or "graph" in r for r in reasons)
    assert any("pads the channel axis" in r for r in reasons)  # the spatial Slice acts per channel


def _two_layer_dense_block(concat_is_output: bool):
    ws = {"c1": _w(4, 8, 3, 3), "c2": _w(4, 12, 3, 3), "head": _w(10, 16, 1, 1)}
    body = "\n".join([
        "g1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, c1)", "d1 = Concat <axis = 1> (x, g1)",
        "g2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (d1, c2)", "d2 = Concat <axis = -3> (d1, g2)",
        "h = Conv <kernel_shape = [1, 1]> (d2, head)", "p = GlobalAveragePool (h)", "y = Flatten <axis = 1> (p)"])
    outputs = "float[1, 10] y" + (", float[1, 16, 5, 5] d2" if concat_is_output else "")
    return make(body, "float[1, 8, 5, 5] x", outputs, ws)


def test_nested_concats_map_ranges_through_both_levels():
    model = _two_layer_dense_block(concat_is_output=False)
    small, rep = _compresses(model, (1, 8, 5, 5), exclude=["c2"])
    dims = initializer_shapes(small)
    assert dims["c1"][0] == 2 and dims["c2"] == (4, 10, 3, 3) and dims["head"] == (10, 14, 1, 1)
    feeds = x(1, 8, 5, 5)
    assert np.allclose(run(small, feeds)[0], run(_as_zeroed_rows(model, small, {"c1"}), feeds)[0], atol=1e-5)
    from onnx_merge import inspect_model

    first = inspect_model(model)["groups"][0]
    assert len(first["consumers"]) == 2 and all("via Concat" in c for c in first["consumers"])


def test_concat_whose_output_is_left_whole_keeps_its_inputs_whole():
    model = _two_layer_dense_block(concat_is_output=True)
    small, rep = compress(model, CompressOptions(round_to=1, ratio=0.3, coupled="prune"))
    dims = initializer_shapes(small)
    assert dims["c1"] == (4, 8, 3, 3) and dims["c2"] == (4, 12, 3, 3)
    reasons = " ".join(s["reason"] for s in rep["skipped"])
    assert "reach Concat" in reasons and "graph output 'd2'" in reasons


@pytest.mark.parametrize("opset, sizes", [(17, None), (17, [4, 8]), (11, [4, 8])])
def test_channel_split_prunes_each_output_range_and_rewrites_sizes(opset, sizes):
    ws = {"w0": _w(12, 3, 3, 3), "wa": _w(5, 6 if sizes is None else 4, 1, 1),
          "wb": _w(5, 6 if sizes is None else 8, 1, 1), "fc": _w(3, 5)}
    if sizes is None:
        split = "s0, s1 = Split <axis = 1> (r)"
    elif opset >= 13:
        ws["sz"] = np.array(sizes, np.int64)
        split = "s0, s1 = Split <axis = 1> (r, sz)"
    else:
        split = f"s0, s1 = Split <axis = 1, split = {sizes}> (r)"
    body = "\n".join(["c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w0)", "r = Relu (c)", split,
                      "a = Conv <kernel_shape = [1, 1]> (s0, wa)", "b = Conv <kernel_shape = [1, 1]> (s1, wb)",
                      "t = Add (a, b)", "p = GlobalAveragePool (t)", "f = Flatten <axis = 1> (p)",
                      "y = Gemm <transB = 1> (f, fc)"])
    model = make(body, "float[1, 3, 6, 6] x", "float[1, 3] y", ws, opset=opset)
    small, rep = _compresses(model, (1, 3, 6, 6), exclude=["wa", "wb"])
    dims = initializer_shapes(small)
    assert dims["w0"][0] == 8 and dims["wa"][1] + dims["wb"][1] == 8
    feeds = x(1, 3, 6, 6)
    assert np.allclose(run(small, feeds)[0], run(_as_zeroed_rows(model, small, {"w0"}), feeds)[0], atol=1e-5)


def test_spatial_slice_shortcut_joins_the_residual_group():
    ws = {"stem": _w(8, 3, 3, 3), "down": _w(8, 8, 3, 3), "fc": _w(4, 8),
          "st": np.array([0, 0], np.int64), "en": np.array([8, 8], np.int64), "ax": np.array([2, 3], np.int64),
          "sp": np.array([2, 2], np.int64)}
    body = "\n".join([
        "s = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, stem)", "r = Relu (s)",
        "d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (r, down)",
        "k = Slice (r, st, en, ax, sp)", "a = Add (d, k)", "h = Relu (a)", "p = GlobalAveragePool (h)",
        "f = Flatten <axis = 1> (p)", "y = Gemm <transB = 1> (f, fc)"])
    model = make(body, "float[1, 3, 8, 8] x", "float[1, 4] y", ws)
    small, rep = _compresses(model, (1, 3, 8, 8))
    dims = initializer_shapes(small)
    assert dims["stem"][0] == dims["down"][0] == dims["down"][1] == dims["fc"][1] == 5


@pytest.mark.parametrize("scale_shape, whole", [((6, 1, 1), False), ((6,), True)])
def test_a_scale_is_sliced_only_when_it_lies_on_the_channel_axis(scale_shape, whole):
    """A (6,) scale on (N, 6, 6, 6) data broadcasts over the width: slicing it with the channels
    would scale the wrong values (or break the broadcast), so its group is left whole."""
    ws = {"w1": _w(6, 3, 3, 3), "w2": _w(6, 6, 3, 3), "w3": _w(4, 6, 3, 3),
          "scale": RNG.uniform(0.5, 1.5, scale_shape).astype(np.float32)}
    body = """a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
        r = Relu (a)
        b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2)
        s = Add (b, r)
        m = Mul (s, scale)
        h = Relu (m)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (h, w3)"""
    model = make(body, "float[2, 3, 6, 6] x", "float[2, 4, 6, 6] y", ws)
    small, rep = compress(model, CompressOptions(round_to=1, ratio=0.5, coupled="prune"))
    assert (initializer_shapes(small)["scale"] == scale_shape) is whole
    assert run(small, x(2, 3, 6, 6))[0].shape == (2, 4, 6, 6)
    if whole:
        assert any("not laid out per channel" in s["reason"] for s in rep["skipped"])


def _depthwise_block(zero_columns=()):
    ws = {"w1": _w(8, 4, 1, 1), **_bn("n1", 8), "dw": _w(8, 1, 3, 3), **_bn("n2", 8), "w3": _w(6, 8, 1, 1)}
    ws["w3"][:, list(zero_columns)] *= 1e-3  # the consumer barely reads these channels
    body = "\n".join(["a = Conv <kernel_shape = [1, 1]> (x, w1)", _bnode("a", "an", "n1"), "ar = HardSwish (an)",
                      "d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (ar, dw)",
                      _bnode("d", "dn", "n2"), "dr = HardSwish (dn)", "y = Conv <kernel_shape = [1, 1]> (dr, w3)"])
    return make(body, "float[1, 4, 6, 6] x", "float[1, 6, 6, 6] y", ws), ws


def test_depthwise_group_removes_what_its_consumer_reads_least_and_restores_bn_means():
    model, ws = _depthwise_block(zero_columns=(1, 5, 6))
    small, rep = compress(model, CompressOptions(ratio=3 / 8, max_group_error=1.0, fold_bn=False))
    entry = next(e for e in rep["layers"] if e["op"] == "coupled group")
    assert entry["kept"] == 5 and "means restored" in entry["method"] and entry["predicted_error"] < 1e-4
    kept_w1 = initializer_shapes(small)["w1"]
    assert kept_w1[0] == 5
    w1 = {t.name: onnx.numpy_helper.to_array(t) for t in small.graph.initializer}["w1"]
    assert [i for i in range(8) if not any(np.array_equal(w1[j], ws["w1"][i]) for j in range(5))] == [1, 5, 6]
    # the removed channels' mean (BN's statistics through HardSwish) goes into the consumer's bias
    bias = next(n for n in small.graph.node if n.op_type == "Conv" and n.output[0] == "y").input[2]
    from onnx_merge.math.activations import activation
    from onnx_merge.math.propagate import activation_stats
    mean, _ = activation_stats(activation("hard_swish"), ws["n2_b"].astype(np.float64), ws["n2_g"].astype(np.float64) ** 2)
    expected = ws["w3"][:, [1, 5, 6], 0, 0] @ mean[[1, 5, 6]]
    np.testing.assert_allclose(onnx.numpy_helper.to_array(next(t for t in small.graph.initializer if t.name == bias)),
                               expected, rtol=1e-4, atol=1e-7)


def test_depthwise_group_is_pruned_less_than_asked_where_the_predicted_error_is_large():
    model, _ = _depthwise_block(zero_columns=(1,))
    small, rep = compress(model, CompressOptions(ratio=0.5, max_group_error=0.05, fold_bn=False))
    entry = next((e for e in rep["layers"] if e["op"] == "coupled group"), None)
    if entry is None:  # not even one channel is cheap enough: left whole, with the reason
        assert any("max-group-error" in s["reason"] for s in rep["skipped"])
    else:
        assert entry["asked_kept"] == 4 and entry["kept"] > 4 and entry["predicted_error"] <= 0.05
        assert "asked 4" in entry["note"]
    whole, rep = compress(model, CompressOptions(ratio=0.5, max_group_error=1.0, fold_bn=False))
    assert initializer_shapes(whole)["w1"][0] == 4


@pytest.mark.parametrize("calibration, rating", [(None, "auto"), ("none", "auto"), ("none", "consumer")])
def test_a_mac_budget_shrinks_a_depthwise_group_where_no_free_chain_exists(calibration, rating):
    """MobileNet's blocks are depthwise groups, not chains: a budget that only saw chains could
    not remove a single MAC here ("cannot be met"). The group's cost curve is measured with its
    channels masked at the consumer's input (or, --sensitivity consumer, predicted by the prune
    plan), so the channels the consumer barely reads go."""
    model, _ = _depthwise_block(zero_columns=(1, 5, 6))
    options = CompressOptions(target_macs=0.65, round_to=1, fold_bn=False, calibration=calibration,
                              sensitivity=rating)
    small, rep = compress(model, options)
    assert rep["macs_after"] <= 0.65 * rep["macs_before"]
    assert rep["allocation"]["sensitivity"] == ("consumer" if rating == "consumer" else "output")
    row = rep["allocation"]["groups"][0]
    assert row["kind"] == "depthwise group" and row["kept"] == 5
    w1 = {t.name: onnx.numpy_helper.to_array(t) for t in small.graph.initializer}["w1"]
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}["w1"]
    assert [i for i in range(8) if not any(np.array_equal(w1[j], original[i]) for j in range(5))] == [1, 5, 6]
    feeds = x(1, 4, 6, 6)
    ref, got = run(model, feeds)[0], run(small, feeds)[0]
    assert np.linalg.norm(got - ref) < 0.05 * np.linalg.norm(ref)
    from onnx_merge.allocation import sensitivity

    (curve,) = sensitivity(model, CompressOptions(fold_bn=False, calibration=calibration, sensitivity=rating))["groups"]
    assert curve["kind"] == "depthwise group" and curve["macs_per_channel"] == pytest.approx(rep["macs_before"] / 8)
    assert curve["curve"][3] < 0.1 * curve["curve"][4]  # the three barely read channels cost little, a fourth does not
