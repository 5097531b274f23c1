"""Per-channel constant Mul/Div/Add/Sub after a Conv or Gemm fold into it (passes/fold_channel_affine.py)."""

import numpy as np
import pytest

from onnx_merge import compress, inspect_model
from tests.helpers import run
from tests.test_passes import make, x

RNG = np.random.default_rng(11)


def _f(*shape, low=None):
    return (RNG.uniform(0.5, 1.5, shape) if low else RNG.normal(0, 0.5, shape)).astype(np.float32)


CONV = {"w1": _f(6, 3, 3, 3), "w2": _f(4, 6, 3, 3)}
FOLDED = {  # body between the first conv's output c and the Relu's input a; extra weights
    "add-bias": ("a = Add (c, t)", {"t": _f(1, 6, 1, 1)}),
    "decomposed-bn": ("m = Mul (c, s)\n a = Add (m, t)", {"s": _f(6, 1, 1, low=True), "t": _f(6, 1, 1)}),
    "sub-div": ("m = Sub (c, t)\n a = Div (m, s)", {"t": _f(1, 6, 1, 1), "s": _f(1, 6, 1, 1, low=True)}),
    "scalar-first": ("a = Mul (s, c)", {"s": np.array([1.7], np.float32)}),
}
KEPT = {  # not affine per channel in c: left alone
    "over-width": ("a = Add (c, t)", {"t": _f(6)}, "Add"),
    "const-minus": ("a = Sub (t, c)", {"t": _f(1, 6, 1, 1)}, "Sub"),
    "second-reader": ("m = Add (c, t)\n a = Add (m, c)", {"t": _f(1, 6, 1, 1)}, "Add"),
}


def _conv_model(body, extra, bias=True):
    ws = dict(CONV) | extra | ({"b1": _f(6)} if bias else {})
    text = f"""c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1{', b1' if bias else ''})
        {body}
        r = Relu (a)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2)"""
    return make(text, "float[2, 3, 6, 6] x", "float[2, 4, 6, 6] y", ws)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", FOLDED)
def test_affine_after_conv_folds_exactly_and_exposes_the_chain(case, bias):
    body, extra = FOLDED[case]
    model = _conv_model(body, extra, bias)
    info = inspect_model(model)
    assert [c["path"] for c in info["chains"]] == [["Relu"]]
    small, rep = compress(model, ratio=0.0)
    assert not {"Add", "Sub", "Mul", "Div"} & {n.op_type for n in small.graph.node}
    feeds = x(2, 3, 6, 6)
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", KEPT)
def test_constants_that_are_not_per_channel_stay(case):
    body, extra, op = KEPT[case]
    model = _conv_model(body, extra)
    small, _ = compress(model, ratio=0.0)
    assert op in {n.op_type for n in small.graph.node}
    feeds = x(2, 3, 6, 6)
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trans_b, c_shape, beta", [(1, None, 1.0), (0, (5,), 1.0), (1, (1, 5), 0.5), (0, (1,), 2.0)])
def test_gemm_scale_and_bias_fold_with_beta(trans_b, c_shape, beta):
    ws = {"w1": _f(*((5, 4) if trans_b else (4, 5))), "w2": _f(3, 5), "s": _f(1, 5, low=True), "t": _f(5)}
    if c_shape:
        ws["c1"] = _f(*c_shape)
    body = f"""h = Gemm <transB = {trans_b}, beta = {beta}> (x, w1{', c1' if c_shape else ''})
        m = Mul (h, s)
        a = Add (t, m)
        r = Relu (a)
        y = Gemm <transB = 1> (r, w2)"""
    model = make(body, "float[3, 4] x", "float[3, 3] y", ws)
    small, rep = compress(model, ratio=0.0)
    assert [n.op_type for n in small.graph.node] == ["Gemm", "Relu", "Gemm"]
    feeds = x(3, 4)
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)
    assert inspect_model(model)["chains"][0]["path"] == ["Relu"]


def test_gemm_bias_that_varies_over_the_batch_is_not_touched():
    ws = {"w1": _f(5, 4), "c1": _f(3, 5), "w2": _f(3, 5), "t": _f(5)}
    body = """h = Gemm <transB = 1> (x, w1, c1)
        a = Add (h, t)
        r = Relu (a)
        y = Gemm <transB = 1> (r, w2)"""
    model = make(body, "float[3, 4] x", "float[3, 3] y", ws)
    small, _ = compress(model, ratio=0.0)
    assert "Add" in {n.op_type for n in small.graph.node}


CONSUMER_SIDE = {  # between the Relu's output r and the second conv's input a
    "mul": ("a = Mul (r, s)", {"s": _f(1, 6, 1, 1, low=True)}, True),
    "div-3d-scale": ("a = Div (r, s)", {"s": _f(6, 1, 1, low=True)}, True),
    "scalar-first": ("a = Mul (s, r)", {"s": np.array(0.7, np.float32)}, True),
    "over-width": ("a = Mul (r, s)", {"s": _f(6, low=True)}, False),
    "const-over-data": ("a = Div (s, r)", {"s": _f(1, 6, 1, 1, low=True)}, False),
}


@pytest.mark.parametrize("case", CONSUMER_SIDE)
def test_scale_after_the_activation_folds_into_the_consumer(case):
    """Relu -> Mul(s) -> Conv: s scales the consumer's input channels, and the chain merges."""
    body, extra, folds = CONSUMER_SIDE[case]
    ws = dict(CONV) | extra | {"b1": _f(6)}
    ws["w1"][5], ws["b1"][5] = 0.5 * ws["w1"][2], 0.5 * ws["b1"][2]  # a planted multiple
    text = f"""c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        {body}
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (a, w2)"""
    model = make(text, "float[2, 3, 6, 6] x", "float[2, 4, 3, 3] y", ws)
    small, rep = compress(model, ratio=1 / 6)
    feeds = x(2, 3, 6, 6)
    assert (not {"Mul", "Div"} & {n.op_type for n in small.graph.node}) is folds
    if folds:  # the merge of the planted multiple is exact through the folded scale
        assert rep["layers"][0]["merged"] == 1
        assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)
    else:  # no merge; s / r is still one function per channel: pruned as a group with s sliced
        assert all(e["merged"] == 0 and "group" in e["method"] for e in rep["layers"])
        assert run(small, feeds)[0].shape == (2, 4, 3, 3)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_scale_before_a_gemm_consumer_folds_into_its_columns(trans_b):
    ws = {"w1": _f(5, 4), "w2": _f(*((3, 5) if trans_b else (5, 3))), "s": _f(5, low=True)}
    body = f"""h = Gemm <transB = 1> (x, w1)
        r = Relu (h)
        a = Mul (r, s)
        y = Gemm <transB = {trans_b}> (a, w2)"""
    model = make(body, "float[3, 4] x", "float[3, 3] y", ws)
    small, _ = compress(model, ratio=0.0)
    assert [n.op_type for n in small.graph.node] == ["Gemm", "Relu", "Gemm"]
    feeds = x(3, 4)
    assert np.allclose(run(small, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)
