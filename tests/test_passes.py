"""Tiny graphs per topology: what is compressed, what is left, and that outputs hold."""

import numpy as np
import onnx
import pytest

from onnx_merge import compress, inspect_model
from tests.helpers import build, header, initializer_shapes, run, rng_weights

RNG = np.random.default_rng(0)


def conv_bn_relu_pool_conv(with_bn=True):
    text = header() + """
    g (float[2, 3, 8, 8] x) => (float[2, 4, 4, 4] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        """ + ("bn = BatchNormalization (c1, g, beta, mu, var)\n r = Relu (bn)" if with_bn else "r = Relu (c1)") + """
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (p, w2, b2)
    }"""
    w = rng_weights(RNG, w1=(8, 3, 3, 3), b1=(8,), w2=(4, 8, 3, 3), b2=(4,))
    if with_bn:
        w |= {"g": RNG.uniform(0.5, 1.5, 8).astype(np.float32), "beta": RNG.normal(0, .1, 8).astype(np.float32),
              "mu": RNG.normal(0, .1, 8).astype(np.float32), "var": RNG.uniform(.5, 1.5, 8).astype(np.float32)}
    text = text.replace("(float[2, 3, 8, 8] x)", "(float[2, 3, 8, 8] x, " + ", ".join(
        f"float[{','.join(map(str, v.shape))}] {k}" for k, v in w.items()) + ")")
    return build(text, w)


def signature(ws: dict) -> str:
    return ", ".join(f"float[{','.join(map(str, v.shape))}] {k}" for k, v in ws.items())


def make(body: str, inputs: str, outputs: str, ws: dict, opset: int = 17) -> onnx.ModelProto:
    return build(header(opset) + f"\ng ({inputs}, {signature(ws)}) => ({outputs}) {{\n{body}\n}}", ws)


def x(*shape):
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("with_bn", [True, False])
def test_conv_bn_relu_pool_conv_shrinks_and_ratio_zero_is_identity(with_bn):
    model = conv_bn_relu_pool_conv(with_bn)
    feeds = x(2, 3, 8, 8)
    same, report = compress(model, ratio=0.0)
    assert np.allclose(run(same, feeds)[0], run(model, feeds)[0], atol=1e-5)
    small, report = compress(model, ratio=0.5, fold_bn=False)
    shapes = initializer_shapes(small)
    assert shapes["w1"] == (4, 3, 3, 3) and shapes["w2"] == (4, 4, 3, 3) and shapes["b1"] == (4,)
    if with_bn:
        assert shapes["g"] == (4,) and shapes["var"] == (4,)
    assert report["layers"][0]["kept"] == 4
    assert run(small, feeds)[0].shape == (2, 4, 4, 4)
    folded, _ = compress(model, ratio=0.5)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert np.allclose(run(folded, feeds)[0], run(small, feeds)[0], atol=1e-4)


def test_planted_duplicate_conv_merge_is_exact_and_prune_is_not():
    model = conv_bn_relu_pool_conv(with_bn=False)
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    b1 = onnx.numpy_helper.to_array(model.graph.initializer[1]).copy()
    w1[[5, 6, 7]], b1[[5, 6, 7]] = 0.1 * w1[[0, 1, 2]], 0.1 * b1[[0, 1, 2]]  # small: l1 drops them first
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(b1, "b1"))
    feeds = x(2, 3, 8, 8)
    ref = run(model, feeds)[0]
    merged, rep = compress(model, ratio=3 / 8)
    assert rep["layers"][0]["merged"] == 3
    assert np.allclose(run(merged, feeds)[0], ref, rtol=1e-4, atol=1e-5)
    pruned, _ = compress(model, ratio=3 / 8, method="prune")
    assert not np.allclose(run(pruned, feeds)[0], ref, rtol=1e-3, atol=1e-3)


def test_flatten_blocks_into_gemm():
    ws = rng_weights(RNG, w1=(6, 3, 3, 3), b1=(6,), w2=(5, 6 * 4 * 4), b2=(5,))
    w1, b1 = ws["w1"], ws["b1"]
    w1[4], b1[4] = 0.05 * w1[1], 0.05 * b1[1]
    body = """c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        p = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (r)
        f = Flatten <axis = 1> (p)
        y = Gemm <transB = 1> (f, w2, b2)"""
    model = make(body, "float[2, 3, 8, 8] x", "float[2, 5] y", ws)
    feeds = x(2, 3, 8, 8)
    small, rep = compress(model, ratio=1 / 6)
    assert initializer_shapes(small)["w2"] == (5, 5 * 16)
    assert rep["layers"][0]["merged"] == 1
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_matmul_add_linear_layers():
    ws = rng_weights(RNG, w1=(10, 8), b1=(8,), w2=(8, 3))
    body = """m = MatMul (x, w1)
        a = Add (m, b1)
        r = Relu (a)
        y = MatMul (r, w2)"""
    model = make(body, "float[4, 10] x", "float[4, 3] y", ws)
    small, rep = compress(model, ratio=0.5)
    shapes = initializer_shapes(small)
    assert shapes["w1"] == (10, 4) and shapes["b1"] == (4,) and shapes["w2"] == (4, 3)
    assert run(small, x(4, 10))[0].shape == (4, 3)


def test_second_layer_merges_on_the_weights_the_first_merge_left():
    """fc2's rows a and b differ only where fc1's removed channel 2 (= 2 x channel 0) feeds
    them: after fc1's merge they are equal, so b merges into a exactly, but only when
    partners are computed on the compensated weights (the default), not the original ones."""
    w1 = np.array([[1.0, -1.0, 2.0], [0.5, 2.0, 1.0]], np.float32)  # (in 2, out 3): column 2 = 2 x column 0
    ws = {"w1": w1, "b1": np.array([0.1, 0.2, 0.2], np.float32),
          "w2": np.array([[1.0, 3.0], [1.0, 1.0], [0.0, -1.0]], np.float32),  # rows a, b as columns
          "b2": np.array([0.3, 0.3], np.float32), "w3": np.array([[1.0], [-2.0]], np.float32)}
    body = """h = Gemm (x, w1, b1)
        r = Relu (h)
        g = Gemm (r, w2, b2)
        s = Relu (g)
        y = MatMul (s, w3)"""
    model = make(body, "float[5, 2] x", "float[5, 1] y", ws)
    feeds = x(5, 2)
    expected = run(model, feeds)[0]
    for independent, exact in ((False, True), (True, False)):
        small, _ = compress(model, ratio=0.3, method="merge", scale_rule="exact", independent_layers=independent)
        assert initializer_shapes(small)["w2"] == (2, 1)
        got = run(small, feeds)[0]
        assert np.allclose(got, expected, atol=1e-5) == exact


def test_residual_is_left_whole_with_reason():
    ws = rng_weights(RNG, w1=(4, 4, 3, 3), w2=(4, 4, 3, 3))
    body = """c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
        r = Relu (c1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2)
        y = Add (c2, r)"""
    model = make(body, "float[1, 4, 5, 5] x", "float[1, 4, 5, 5] y", ws)
    small, rep = compress(model, ratio=0.5)
    assert rep["layers"] == []
    assert any("coupled" in s["reason"] or "read by 2" in s["reason"] for s in rep["skipped"])
    assert initializer_shapes(small) == initializer_shapes(model)
    info = inspect_model(model)
    assert info["chains"] == [] and info["skipped"]


def test_sigmoid_chain_is_pruned_not_merged():
    ws = rng_weights(RNG, w1=(6, 4), b1=(6,), w2=(3, 6), b2=(3,))
    body = """h = Gemm <transB = 1> (x, w1, b1)
        s = Sigmoid (h)
        y = Gemm <transB = 1> (s, w2, b2)"""
    model = make(body, "float[2, 4] x", "float[2, 3] y", ws)
    small, rep = compress(model, ratio=0.5, method="merge")
    assert rep["layers"][0]["method"] == "prune" and "positively homogeneous" in rep["layers"][0]["note"]
    small, rep = compress(model, ratio=0.5)  # regress models the sigmoid: regressed, never merged
    assert rep["layers"][0]["method"] == "regress" and rep["layers"][0]["merged"] == 0


@pytest.mark.parametrize("opset, clip, merges", [
    (13, "Clip (h, zero)", True), (9, "Clip <min = 0.0> (h)", True), (13, "Clip (h, zero, six)", False),
    (13, "Max (zero, h)", True), (13, "Max (h, six)", False)],
    ids=["clamp-min-0", "clamp-min-0-opset9", "relu6", "max-0-dynamo-clamp", "max-6"])
def test_clip_or_max_at_zero_is_a_relu_and_relu6_is_not(opset, clip, merges):
    ws = rng_weights(RNG, w1=(6, 4), b1=(6,), w2=(3, 6), b2=(3,))
    _planted_gemm(ws, "w1", 1, 5)
    ws["b1"][5] = 0.05 * ws["b1"][1]
    ws |= {"zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)} if opset >= 11 else {}
    body = f"""h = Gemm <transB = 1> (x, w1, b1)
        s = {clip}
        y = Gemm <transB = 1> (s, w2, b2)"""
    model = make(body, "float[2, 4] x", "float[2, 3] y", ws, opset=opset)
    small, rep = compress(model, ratio=1 / 6, method="merge")
    # Max(h, 6) has no name, but it is elementwise with a constant: one function per channel, pruned
    assert (rep["layers"][0]["method"] != "prune") is merges
    if merges:
        assert rep["layers"][0]["merged"] == 1 and _outputs_match(model, small, x(2, 4))


def test_shared_weight_is_not_touched():
    ws = rng_weights(RNG, w=(4, 4))
    body = """h = MatMul (x, w)
        r = Relu (h)
        y = MatMul (r, w)"""
    model = make(body, "float[2, 4] x", "float[2, 4] y", ws)
    small, rep = compress(model, ratio=0.5)
    assert rep["layers"] == [] and "shared" in " ".join(s["reason"] for s in rep["skipped"])


def test_layer_ratio_and_exclude_globs():
    ws = rng_weights(RNG, w1=(8, 6), b1=(8,), w2=(8, 8), b2=(8,), w3=(2, 8), b3=(2,))
    body = """h1 = Gemm <transB = 1> (x, w1, b1)
        r1 = Relu (h1)
        h2 = Gemm <transB = 1> (r1, w2, b2)
        r2 = Relu (h2)
        y = Gemm <transB = 1> (r2, w3, b3)"""
    model = make(body, "float[2, 6] x", "float[2, 2] y", ws)
    small, rep = compress(model, ratio=0.5, layer_ratios=[("w2", 0.25)])
    shapes = initializer_shapes(small)
    assert shapes["w1"] == (4, 6) and shapes["w2"] == (6, 4) and shapes["w3"] == (2, 6)
    small, rep = compress(model, ratio=0.5, exclude=["h1"])  # matched by output tensor name
    assert initializer_shapes(small)["w1"] == (8, 6)


def test_constant_subgraph_weights_are_folded():
    w1 = RNG.standard_normal((6, 4)).astype(np.float32)
    ws = rng_weights(RNG, w2=(3, 6))
    vals = ", ".join(repr(float(v)) for v in w1.ravel())
    body = f"""wc = Constant <value = float[6, 4] {{{vals}}}> ()
        wi = Identity (wc)
        h = Gemm <transB = 1> (x, wi)
        r = Relu (h)
        y = Gemm <transB = 1> (r, w2)"""
    model = make(body, "float[2, 4] x", "float[2, 3] y", ws)
    small, rep = compress(model, ratio=0.5)
    assert len(rep["layers"]) == 1
    assert run(small, x(2, 4))[0].shape == (2, 3)


@pytest.mark.parametrize("op", ["Transpose <perm = [1, 0]>", "Identity"])
def test_a_weight_tied_across_layers_is_folded_into_one_initializer(op):
    """ALBERT's layout: one learned weight, an Identity (or Transpose) per layer that reads it.
    Folding must not store a copy per layer: --ratio 0 grew the file by the copies (+58 % on
    ALBERT) and counted them as parameters; --ratio 0.3 untied them."""
    ws = rng_weights(RNG, w=(4, 4), w2=(3, 4))
    body = f"""t1 = {op} (w)
        h1 = MatMul (x, t1)
        r1 = Relu (h1)
        t2 = {op} (w)
        h2 = MatMul (r1, t2)
        r2 = Relu (h2)
        y = Gemm <transB = 1> (r2, w2)"""
    model = make(body, "float[2, 4] x", "float[2, 3] y", ws)
    same, rep = compress(model, ratio=0.0)
    assert rep["params_after"] == rep["params_before"] == 4 * 4 + 3 * 4
    assert sum(1 for t in same.graph.initializer if tuple(t.dims) == (4, 4)) == 1
    feeds = x(2, 4)
    assert np.allclose(run(same, feeds)[0], run(model, feeds)[0], atol=1e-5)
    _, rep = compress(model, ratio=0.5)  # the tie stays: both layers would have to lose the same channels
    assert rep["params_after"] == rep["params_before"]
    assert any("shared" in s["reason"] for s in rep["skipped"])


def test_old_opset_dropout_and_reshape():
    ws = rng_weights(RNG, w1=(4, 3, 3, 3), b1=(4,), w2=(2, 4 * 9), b2=(2,))
    ws["shape"] = np.array([0, 36], dtype=np.int64)
    body = """c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        d = Dropout (r)
        f = Reshape (d, shape)
        y = Gemm <transB = 1> (f, w2, b2)"""
    model = build(header(11) + f"\ng (float[1, 3, 3, 3] x, {signature(ws)}) => (float[1, 2] y) {{\n{body}\n}}", ws)
    small, rep = compress(model, ratio=0.5)
    assert initializer_shapes(small)["w2"] == (2, 18)
    assert onnx.numpy_helper.to_array([t for t in small.graph.initializer if t.name == "shape"][0]).tolist() == [0, 18]
    assert run(small, x(1, 3, 3, 3))[0].shape == (1, 2)


def _outputs_match(model, small, feeds, tol=1e-4):
    return np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=tol, atol=tol)


def _planted_gemm(ws: dict, name: str, src: int, dst: int, scale: float = 0.05, trans_b: bool = True):
    w = ws[name]
    if trans_b:
        w[dst] = scale * w[src]
    else:
        w[:, dst] = scale * w[:, src]


def test_gemm_without_transb_and_leaky_relu_merge_exactly():
    ws = rng_weights(RNG, w1=(5, 6), w2=(6, 3))
    _planted_gemm(ws, "w1", 0, 5, trans_b=False)
    body = """h = Gemm (x, w1)
        r = LeakyRelu <alpha = 0.1> (h)
        y = Gemm (r, w2)"""
    model = make(body, "float[3, 5] x", "float[3, 3] y", ws)
    small, rep = compress(model, ratio=1 / 6)
    assert initializer_shapes(small)["w1"] == (5, 5) and initializer_shapes(small)["w2"] == (5, 3)
    assert rep["layers"][0]["merged"] == 1 and _outputs_match(model, small, x(3, 5))


def test_conv_transpose_consumer():
    ws = rng_weights(RNG, w1=(6, 2, 3, 3), w2=(6, 3, 2, 2))
    ws["w1"][5] = 0.05 * ws["w1"][2]
    body = """c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
        r = Relu (c)
        y = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (r, w2)"""
    model = make(body, "float[1, 2, 4, 4] x", "float[1, 3, 8, 8] y", ws)
    small, rep = compress(model, ratio=1 / 6)
    assert initializer_shapes(small)["w2"] == (5, 3, 2, 2) and _outputs_match(model, small, x(1, 2, 4, 4))


def test_per_channel_prelu_is_pruned_with_its_slopes():
    """A slope per channel rules a merge out (channels would trade slopes) but not a prune:
    the slopes are sliced with the producer. Dead channels go, so the output is unchanged."""
    ws = rng_weights(RNG, w1=(6, 2, 3, 3), b1=(6,), w2=(3, 6, 3, 3))
    ws["w1"][[1, 4]], ws["b1"][[1, 4]] = 0.0, 0.0
    ws["slope"] = RNG.uniform(0.05, 0.3, (6, 1, 1)).astype(np.float32)
    body = """c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = PRelu (c, slope)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2)"""
    model = make(body, "float[2, 2, 5, 5] x", "float[2, 3, 5, 5] y", ws)
    small, rep = compress(model, ratio=1 / 3)
    assert rep["layers"][0]["method"] == "prune" and initializer_shapes(small)["slope"] == (4, 1, 1)
    assert _outputs_match(model, small, x(2, 2, 5, 5))


def test_prelu_slopes_not_laid_out_per_channel_leave_the_layer_whole():
    ws = rng_weights(RNG, w1=(6, 2, 3, 3), w2=(3, 6, 3, 3))
    ws["slope"] = RNG.uniform(0.05, 0.3, 6).astype(np.float32)  # broadcasts over the width, not the channels
    body = """c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
        r = PRelu (c, slope)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2)"""
    model = make(body, "float[2, 2, 6, 6] x", "float[2, 3, 6, 6] y", ws)
    small, rep = compress(model, ratio=0.5)
    assert rep["layers"] == [] and "not one per channel" in rep["skipped"][0]["reason"]


def test_bn_after_relu_is_pruned_with_its_parameters():
    ws = rng_weights(RNG, w1=(4, 6), w2=(3, 4))
    ws |= {"g": np.ones(4, np.float32), "b": np.zeros(4, np.float32), "m": np.zeros(4, np.float32),
           "v": np.ones(4, np.float32)}
    body = """h = Gemm <transB = 1> (x, w1)
        r = Relu (h)
        n = BatchNormalization (r, g, b, m, v)
        y = Gemm <transB = 1> (n, w2)"""
    model = make(body, "float[2, 6] x", "float[2, 3] y", ws)
    small, rep = compress(model, ratio=0.5)
    assert rep["layers"][0]["method"] == "prune" and initializer_shapes(small)["g"] == (2,)
    assert run(small, x(2, 6))[0].shape == (2, 3)


def test_depthwise_consumer_and_subgraph_reader_are_left_alone():
    ws = rng_weights(RNG, w1=(4, 4, 1, 1), dw=(4, 1, 3, 3))
    body = """c = Conv <kernel_shape = [1, 1]> (x, w1)
        r = Relu (c)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 4> (r, dw)"""
    model = make(body, "float[1, 4, 5, 5] x", "float[1, 4, 5, 5] y", ws)
    small, rep = compress(model, ratio=0.5)
    assert rep["layers"] == [] and "depthwise" in " ".join(s["reason"] for s in rep["skipped"])
    ws = rng_weights(RNG, w1=(4, 3), w2=(2, 4))
    body = """h = Gemm <transB = 1> (x, w1)
        r = Relu (h)
        y = Gemm <transB = 1> (r, w2)
        z = If (cond) <then_branch = g1 () => (float[2, 4] o1) { o1 = Identity (r) },
                       else_branch = g2 () => (float[2, 4] o2) { o2 = Identity (r) }>"""
    model = make(body, "float[2, 3] x, bool cond", "float[2, 2] y, float[2, 4] z", ws)
    small, rep = compress(model, ratio=0.5)
    assert rep["layers"] == [] and initializer_shapes(small) == initializer_shapes(model)
    feeds = x(2, 3) | {"cond": np.array(True)}
    assert all(np.allclose(a, b) for a, b in zip(run(small, feeds), run(model, feeds)))


@pytest.mark.parametrize("spatial", [1, 3], ids=["conv1d", "conv3d"])
def test_conv1d_and_conv3d_chains_merge_exactly(spatial):
    k = [3] * spatial
    ws = rng_weights(RNG, w1=(6, 2, *k), b1=(6,), w2=(3, 6, *k))
    ws["w1"][5], ws["b1"][5] = 0.05 * ws["w1"][1], 0.05 * ws["b1"][1]
    pads = ", ".join(["1"] * (2 * spatial))
    ks = ", ".join(map(str, k))
    body = f"""c = Conv <kernel_shape = [{ks}], pads = [{pads}]> (x, w1, b1)
        r = Relu (c)
        y = Conv <kernel_shape = [{ks}], pads = [{pads}]> (r, w2)"""
    shape = [1, 2] + [5] * spatial
    model = make(body, f"float[{', '.join(map(str, shape))}] x", f"float[1, 3, {', '.join(['5'] * spatial)}] y", ws)
    small, rep = compress(model, ratio=1 / 6)
    assert initializer_shapes(small)["w2"][1] == 5 and rep["layers"][0]["merged"] == 1
    assert _outputs_match(model, small, x(*shape))


def test_auto_defaults_resolve_per_layer_and_explicit_options_win(monkeypatch):
    """A Conv reaching its ReLU without BN (BN folded at export) is ranked by l2-path and merged with
    the norm-ratio scale; a Conv with BN (merge method) keeps l1-norm; a MatMul layer is regressed by
    default (its own selection), and with merge keeps the set that merges best (merge-cost), by
    l1-norm when it is only pruned."""
    folded = conv_bn_relu_pool_conv(with_bn=False)
    layer = compress(folded, ratio=0.5)[1]["layers"][0]
    assert layer["merged"] and (layer["criterion"], layer["scale_rule"]) == ("l2-path", "exact")
    layer = compress(folded, ratio=0.5, criterion="l1-norm", scale_rule="projection")[1]["layers"][0]
    assert layer["merged"] and (layer["criterion"], layer["scale_rule"]) == ("l1-norm", "projection")
    assert compress(conv_bn_relu_pool_conv(with_bn=True), ratio=0.5, method="merge")[1]["layers"][0]["criterion"] == "l1-norm"
    assert "criterion" not in compress(conv_bn_relu_pool_conv(with_bn=True), ratio=0.5)[1]["layers"][0]  # regress
    ws = rng_weights(RNG, w1=(10, 8), b1=(8,), w2=(8, 3))
    mlp = make("m = MatMul (x, w1)\n a = Add (m, b1)\n r = Relu (a)\n y = MatMul (r, w2)", "float[4, 10] x", "float[4, 3] y", ws)
    layer = compress(mlp, ratio=0.5)[1]["layers"][0]
    assert layer["method"] == "regress" and "criterion" not in layer
    assert compress(mlp, ratio=0.5, method="merge")[1]["layers"][0]["criterion"] == "merge-cost"
    assert compress(mlp, ratio=0.5, method="prune")[1]["layers"][0]["criterion"] == "l1-norm"
    monkeypatch.setattr("onnx_merge.options.MAX_MERGE_COST_CHANNELS", 4)  # its N x N matrix: wide layers rank by l1
    assert compress(mlp, ratio=0.5, method="merge")[1]["layers"][0]["criterion"] == "l1-norm"
    assert compress(mlp, ratio=0.5, method="merge", criterion="merge-cost")[1]["layers"][0]["criterion"] == "merge-cost"


@pytest.mark.parametrize("shape, in_axis, block", [((5, 6, 3, 3), 1, 1), ((7, 6 * 4), 1, 4), ((6 * 4, 7), 0, 4)])
def test_input_channel_norms_match_the_channel_first_view(shape, in_axis, block):
    from onnx_merge.passes.merge_channels import input_channel_norms

    w = RNG.standard_normal(shape).astype(np.float32)
    view = np.moveaxis(w, in_axis, 0).reshape(6, -1)  # channel n owns features n * block ... (n + 1) * block - 1
    assert np.allclose(input_channel_norms(w, in_axis, 6), np.linalg.norm(view.astype(np.float64), axis=1))


def _head_model(head: str) -> tuple[onnx.ModelProto, dict]:
    """Conv -> Relu -> <head> -> Gemm with a planted duplicate (channel 4 = 0.05 * channel 1)."""
    features = 6 if head.startswith("reduce") else 6 * 16
    ws = rng_weights(RNG, w1=(6, 3, 3, 3), b1=(6,), w2=(5, features), b2=(5,))
    ws["w1"][4], ws["b1"][4] = 0.05 * ws["w1"][1], 0.05 * ws["b1"][1]
    heads = {
        "reduce-input": "h = ReduceMean <keepdims = 0> (r, axes)",  # opset 18: axes as an input
        "reduce-negative": "m = ReduceMax <axes = [-2, -1]> (r)\n f = Flatten <axis = 1> (m)",
        "reduce-channels": "h = ReduceMean <keepdims = 0> (r, axes)",
        # TF-style heads: NHWC first, then the spatial mean (axes 1, 2 there), channels stay last
        "reduce-nhwc": "t = Transpose <perm = [0, 2, 3, 1]> (r)\n h = ReduceMean <keepdims = 0> (t, axes)",
        "reduce-nhwc-keepdims": "t = Transpose <perm = [0, 2, 3, 1]> (r)\n m = ReduceMean <axes = [-3, -2]> (t)\n"
                                " f = Flatten <axis = 1> (m)",
        "reduce-nhwc-channels": "t = Transpose <perm = [0, 2, 3, 1]> (r)\n h = ReduceMean <keepdims = 0> (t, axes)",
        "shape-gather": """s = Shape (r)
            n = Gather <axis = 0> (s, zero)
            u = Unsqueeze (n, zero1)
            shape = Concat <axis = 0> (u, minus1)
            h = Reshape (r, shape)""",
        "shape-slice": """s = Shape (r)
            n = Slice (s, zero1, one1)
            shape = Concat <axis = 0> (n, minus1)
            h = Reshape (r, shape)""",
        "shape-of-input": """s = Shape (x)
            n = Gather <axis = 0> (s, zero)
            u = Unsqueeze (n, zero1)
            shape = Concat <axis = 0> (u, minus1)
            h = Reshape (r, shape)""",
    }
    body = "c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)\n r = Relu (c)\n" + heads[head]
    body += "\n y = Gemm <transB = 1> (" + ("f" if " f = " in "\n " + heads[head] else "h") + ", w2, b2)"
    axes = {"reduce-channels": [1, 2], "reduce-nhwc": [1, 2]}.get(head, [2, 3])
    consts = {"axes": np.array(axes, np.int64), "zero": np.array(0, np.int64), "zero1": np.array([0], np.int64), "one1": np.array([1], np.int64),
              "minus1": np.array([-1], np.int64)}
    used = {k: v for k, v in consts.items() if any(f"{k})" in line or f"{k}," in line for line in body.splitlines())}
    if head in ("reduce-channels", "reduce-nhwc-channels"):
        ws["w2"] = rng_weights(RNG, w2=(5, 4))["w2"]
    sig = ", ".join(f"int64[{','.join(map(str, v.shape))}] {k}" for k, v in used.items())
    opset = 17 if "<axes" in heads[head] else 18  # Reduce* axes: an attribute before opset 18
    model = build(header(opset) + f"\ng (float[N, 3, 4, 4] x, {signature(ws)}{', ' + sig if sig else ''}) => "
                  f"(float[N, 5] y) {{\n{body}\n}}", ws | used)
    return model, ws


@pytest.mark.parametrize("head", ["reduce-input", "reduce-negative", "reduce-nhwc", "reduce-nhwc-keepdims",
                                  "shape-gather", "shape-slice"])
def test_heads_that_keep_channels_apart_merge_exactly(head):
    """A spatial reduction, or a reshape to (x.shape[0], -1) computed from Shape(x), reads each
    channel on its own: the conv before it is compressed and the planted duplicate merges exactly."""
    model, _ = _head_model(head)
    small, rep = compress(model, ratio=1 / 6)
    assert [(entry["channels"], entry["kept"], entry["merged"]) for entry in rep["layers"]] == [(6, 5, 1)]
    feeds = x(3, 3, 4, 4)
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)
    if head.startswith("shape"):  # the shape arithmetic is gone, the batch stays free
        assert [n.op_type for n in small.graph.node] == ["Conv", "Relu", "Flatten", "Gemm"]
        assert run(small, x(1, 3, 4, 4))[0].shape == (1, 5)


@pytest.mark.parametrize("head, reason", [("reduce-channels", "not provably spatial"),
                                          ("reduce-nhwc-channels", "not provably spatial"),
                                          ("shape-of-input", "computed shape")])
def test_heads_that_mix_channels_are_left_whole(head, reason):
    model, _ = _head_model(head)
    small, rep = compress(model, ratio=0.5)
    assert not rep.get("layers")
    assert any(reason in s["reason"] for s in rep["skipped"])
    feeds = x(2, 3, 4, 4)
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0])


def test_value_info_of_a_shrunk_initializer_follows_it():
    """The torch dynamo exporter lists initializers in value_info; stale entries fail the checker."""
    model = conv_bn_relu_pool_conv(with_bn=False)
    for t in model.graph.initializer:
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    small, _ = compress(model, ratio=0.5)
    onnx.checker.check_model(small, full_check=True)
    declared = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in small.graph.value_info}
    assert declared["w1"] == (4, 3, 3, 3) and declared["w2"] == (4, 4, 3, 3)


CHANNEL_LAST_HEADS = {
    # a MatMul's output keeps its channels last: Flatten interleaves them
    "matmul-flatten": ("float[2, 3, 5] x", dict(w1=(5, 6), b1=(6,), w2=(4, 3 * 6), b2=(4,)),
                       "m = MatMul (x, w1)\n a = Add (m, b1)\n r = Relu (a)\n f = Flatten <axis = 1> (r)"),
    # the NHWC flatten of TF-style heads (x.permute(0, 2, 3, 1).flatten(1) in torch)
    "transpose-flatten": ("float[2, 3, 4, 4] x", dict(w1=(6, 3, 3, 3), b1=(6,), w2=(4, 16 * 6), b2=(4,)),
                          "c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)\n r = Relu (c)\n"
                          " t = Transpose <perm = [0, 2, 3, 1]> (r)\n f = Flatten <axis = 1> (t)"),
}


@pytest.mark.parametrize("head", sorted(CHANNEL_LAST_HEADS))
@pytest.mark.parametrize("criterion", ["l1-norm", "l2-path"])
def test_channel_last_flatten_interleaves_channels(head, criterion):
    """Channel c owns features c, c + N, ... there: a planted duplicate must still merge exactly."""
    inputs, shapes, body = CHANNEL_LAST_HEADS[head]
    ws = rng_weights(RNG, **shapes)
    if head == "matmul-flatten":
        ws["w1"][:, 4], ws["b1"][4] = 0.05 * ws["w1"][:, 1], 0.05 * ws["b1"][1]
    else:
        ws["w1"][4], ws["b1"][4] = 0.05 * ws["w1"][1], 0.05 * ws["b1"][1]
    model = make(body + "\n y = Gemm <transB = 1> (f, w2, b2)", inputs, "float[2, 4] y", ws)
    assert inspect_model(model)["chains"][0]["interleaved"]
    small, rep = compress(model, ratio=1 / 6, criterion=criterion)
    assert rep["layers"][0]["kept"] == 5 and rep["layers"][0]["merged"] == 1
    feeds = {"x": RNG.standard_normal([int(d) for d in inputs[6:inputs.index("]")].split(", ")]).astype(np.float32)}
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axes, merges", [("[1]", True), ("[-2]", True), ("[-1]", False), ("[0]", False)])
def test_a_reduction_over_a_matmul_output_is_judged_by_its_inferred_rank(axes, merges):
    """Mean over the tokens of a MatMul's (N, T, C) output reads each channel on its own; the
    MatMul does not fix its output's rank, shape inference gives it."""
    ws = rng_weights(RNG, w1=(5, 6), b1=(6,), w2=(4, 6 if merges else 3), b2=(4,))
    ws["w1"][:, 4], ws["b1"][4] = 0.05 * ws["w1"][:, 1], 0.05 * ws["b1"][1]
    body = (f"m = MatMul (x, w1)\n a = Add (m, b1)\n r = Relu (a)\n h = ReduceMean <axes = {axes}, keepdims = 0> (r)\n"
            " y = Gemm <transB = 1> (h, w2, b2)")
    if axes == "[0]":  # over the batch: (T, C) rows reach the Gemm, mixing samples
        ws["w2"] = rng_weights(RNG, w2=(4, 6))["w2"]
    model = make(body, "float[N, 3, 5] x" if axes != "[0]" else "float[2, 3, 5] x", "float[M, 4] y", ws)
    small, rep = compress(model, ratio=1 / 6)
    if merges:
        assert [(e["channels"], e["kept"], e["merged"]) for e in rep["layers"]] == [(6, 5, 1)]
        feeds = x(2, 3, 5)
        assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)
    else:
        assert not rep["layers"] and any("not provably spatial" in r["reason"] for r in rep["skipped"])


def test_other_transposes_and_channel_last_residuals_are_left_whole():
    ws = rng_weights(RNG, w1=(6, 3, 3, 3), b1=(6,), w2=(4, 16 * 6), b2=(4,))
    body = ("c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)\n r = Relu (c)\n"
            " t = Transpose <perm = [0, 1, 3, 2]> (r)\n f = Flatten <axis = 1> (t)\n y = Gemm <transB = 1> (f, w2, b2)")
    model = make(body, "float[2, 3, 4, 4] x", "float[2, 4] y", ws)
    _, rep = compress(model, ratio=0.5)
    assert not rep["layers"] and any("permutes axes [0, 1, 3, 2]" in s["reason"] for s in rep["skipped"])
    # A residual over a MatMul's channels-last output: the coupled pass leaves it whole.
    ws = rng_weights(RNG, w1=(5, 6), b1=(6,), w3=(5, 6), w2=(4, 3 * 6), b2=(4,))
    body = ("m = MatMul (x, w1)\n a = Add (m, b1)\n m3 = MatMul (x, w3)\n s = Add (a, m3)\n r = Relu (s)\n"
            " f = Flatten <axis = 1> (r)\n y = Gemm <transB = 1> (f, w2, b2)")
    model = make(body, "float[2, 3, 5] x", "float[2, 4] y", ws)
    small, rep = compress(model, ratio=0.5, coupled="prune")
    assert initializer_shapes(small) == initializer_shapes(model)


@pytest.mark.parametrize("body, out", [
    # a MatMul contracts the conv output's width, which only happens to equal its 8 channels
    ("c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)\n r = Relu (c)\n y = MatMul (r, w2)",
     "float[2, 8, 8, 5] y"),
    # a Conv reads axis 1 of the NHWC tensor: its height, not the channels
    ("c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)\n r = Relu (c)\n"
     " t = Transpose <perm = [0, 2, 3, 1]> (r)\n y = Conv <kernel_shape = [1, 1]> (t, w3)", "float[2, 5, 8, 8] y"),
], ids=["matmul-after-conv", "conv-after-nhwc"])
def test_a_consumer_contracting_another_axis_of_the_same_size_is_refused(body, out):
    ws = rng_weights(RNG, w1=(8, 3, 3, 3), b1=(8,), w2=(8, 5), w3=(5, 8, 1, 1))
    ws = {k: v for k, v in ws.items() if k in body}
    model = make(body, "float[2, 3, 8, 8] x", out, ws)
    small, rep = compress(model, ratio=0.5)
    assert not rep["layers"] and any("the channels are on" in s["reason"] for s in rep["skipped"])
    assert initializer_shapes(small) == initializer_shapes(model)


def test_quantized_layers_are_named_with_the_way_out():
    """QDQ weights and QLinear ops cannot be merged in place; the reason says what to do instead."""
    ws = {"wq": RNG.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "ws": np.float32(0.01),
          "w2": rng_weights(RNG, w2=(2, 4, 1, 1))["w2"]}
    body = """w1 = DequantizeLinear (wq, ws)
        c = Conv <kernel_shape = [3, 3]> (x, w1)
        r = Relu (c)
        y = Conv (r, w2)"""
    qdq = build(header() + "\ng (float[1, 3, 5, 5] x, int8[4, 3, 3, 3] wq, float ws, float[2, 4, 1, 1] w2)"
                " => (float[1, 2, 3, 3] y) {\n" + body + "\n}", ws)
    ws = {"xs": np.float32(0.02), "xz": np.uint8(128), "wq": ws["wq"], "ws": np.float32(0.01), "wz": np.int8(0),
          "ys": np.float32(0.05), "yz": np.uint8(128)}
    body = "y = QLinearConv <kernel_shape = [3, 3]> (x, xs, xz, wq, ws, wz, ys, yz)"
    qop = build(header() + "\ng (uint8[1, 3, 5, 5] x, float xs, uint8 xz, int8[4, 3, 3, 3] wq, float ws, int8 wz, "
                "float ys, uint8 yz) => (uint8[1, 4, 3, 3] y) {\n" + body + "\n}", ws)
    for model in (qdq, qop):
        reasons = " ".join(s["reason"] for s in inspect_model(model)["skipped"])
        assert "compress the float model, then quantize it" in reasons
