"""Transformer forms: shared biases, attention heads, feed-forward blocks (onnx.parser graphs)."""

import copy

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_merge import compress
from tests.helpers import initializer_shapes, rng_weights, run
from tests.test_passes import make

RNG = np.random.default_rng(0)


def kept_columns(original: np.ndarray, pruned: np.ndarray) -> list[int]:
    """Which columns of ``original`` survive in ``pruned`` (a pure prune keeps them unchanged)."""
    return [next(j for j in range(original.shape[1]) if np.array_equal(original[:, j], col)) for col in pruned.T]


def shared_bias_mlp():
    ws = rng_weights(RNG, w1=(8, 8), w2=(8, 8)) | {"b": RNG.standard_normal(8).astype(np.float32),
                                                   "g": np.ones(8, np.float32)}
    body = """m1 = MatMul (x, w1)
        a1 = Add (m1, b)
        r = Relu (a1)
        m2 = MatMul (r, w2)
        a2 = Add (m2, b)
        y = LayerNormalization <axis = -1> (a2, g, b)"""
    return make(body, "float[4, 8] x", "float[4, 8] y", ws), ws


def test_a_shared_bias_is_copied_per_layer_and_the_layer_prunes():
    model, ws = shared_bias_mlp()
    small, rep = compress(model, ratio=0.5, method="prune")
    assert [r["channels"] for r in rep["layers"]] == [8]  # the first layer; the second feeds the output
    shapes = initializer_shapes(small)
    assert shapes["w1"] == (8, 4) and shapes["w2"] == (4, 8) and shapes["b"] == (8,)
    kept = kept_columns(ws["w1"], numpy_helper.to_array(next(t for t in small.graph.initializer if t.name == "w1")))
    # the oracle: the original with the removed channels of the first layer zeroed
    oracle_ws = dict(ws)
    removed = [j for j in range(8) if j not in kept]
    oracle_ws["w1"] = ws["w1"].copy()
    oracle_ws["w1"][:, removed] = 0
    oracle = make("""m1 = MatMul (x, w1)
        a1 = Add (m1, b1)
        r = Relu (a1)
        m2 = MatMul (r, w2)
        a2 = Add (m2, b)
        y = LayerNormalization <axis = -1> (a2, g, b)""", "float[4, 8] x", "float[4, 8] y",
                  oracle_ws | {"b1": np.where(np.isin(np.arange(8), removed), 0, ws["b"]).astype(np.float32)})
    feeds = {"x": RNG.standard_normal((4, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(small, feeds)[0], run(oracle, feeds)[0], atol=1e-5)
    assert rep["params_before"] == sum(v.size for v in ws.values())


def test_copies_left_unchanged_are_shared_again():
    model, ws = shared_bias_mlp()
    small, rep = compress(model, ratio=0.0)
    assert sorted(initializer_shapes(small)) == sorted(ws)
    feeds = {"x": RNG.standard_normal((4, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(small, feeds)[0], run(model, feeds)[0])
    assert rep["params_after"] == rep["params_before"] == sum(v.size for v in ws.values())


# -- attention heads -----------------------------------------------------------------------
H, D, T = 4, 2, 5
C = H * D


def typed(ws: dict) -> str:
    kinds = {np.dtype(np.float32): "float", np.dtype(np.int64): "int64"}
    return ", ".join(f"{kinds[v.dtype]}[{','.join(map(str, v.shape))}] {k}" for k, v in ws.items())


def attention(shapes: str, extra: dict, score: str = "ss = Mul (s, scale)", inputs: str = "") -> tuple:
    """One self-attention block on x (N, T, C); ``shapes`` defines shape4 (to N, T, H, d) and
    shape3 (back to N, T, C)."""
    ws = rng_weights(RNG, wq=(C, C), wk=(C, C), wv=(C, C), wo=(C, C))
    ws |= {f"b{n}": RNG.standard_normal(C).astype(np.float32) for n in "qkvo"}
    ws |= {"scale": np.array(D ** -0.5, np.float32)} | extra
    body = f"""
        q = MatMul (x, wq)
        qb = Add (q, bq)
        k = MatMul (x, wk)
        kb = Add (k, bk)
        v = MatMul (x, wv)
        vb = Add (v, bv)
        {shapes}
        q4 = Reshape (qb, shape4)
        qt = Transpose <perm = [0, 2, 1, 3]> (q4)
        k4 = Reshape (kb, shape4)
        kt = Transpose <perm = [0, 2, 3, 1]> (k4)
        v4 = Reshape (vb, shape4)
        vt = Transpose <perm = [0, 2, 1, 3]> (v4)
        s = MatMul (qt, kt)
        {score}
        p = Softmax <axis = -1> (ss)
        o = MatMul (p, vt)
        ot = Transpose <perm = [0, 2, 1, 3]> (o)
        o3 = Reshape (ot, shape3)
        y0 = MatMul (o3, wo)
        y = Add (y0, bo)"""
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {T}, {C}] x, {inputs + ", " if inputs else ""}{typed(ws)}) => (float[N, {T}, {C}] y) {{{body}
    }}"""
    from tests.helpers import build

    return build(text, ws), ws


CONSTANT_SHAPES = ("", {"shape4": np.array([0, 0, H, D], np.int64), "shape3": np.array([0, 0, C], np.int64)})
# the head count a constant inside a Shape computation, the merged width read from x's shape (timm)
COMPUTED_SHAPES = ("""sx = Shape (x)
        nt = Slice (sx, zero, two)
        c = Slice (sx, two, three)
        shape4 = Concat <axis = 0> (nt, heads, dim)
        shape3 = Concat <axis = 0> (nt, c)""", {
    "zero": np.array([0], np.int64), "two": np.array([2], np.int64), "three": np.array([3], np.int64),
    "heads": np.array([H], np.int64), "dim": np.array([D], np.int64)})


def zeroed_values(model, ws: dict, removed: list[int]):
    """The oracle: ``model`` with the V weight columns of the ``removed`` heads zeroed (biases kept)."""
    wv = ws["wv"].copy()
    for h in removed:
        wv[:, h * D:(h + 1) * D] = 0
    oracle = copy.deepcopy(model)
    next(t for t in oracle.graph.initializer if t.name == "wv").CopyFrom(numpy_helper.from_array(wv, "wv"))
    return oracle


@pytest.mark.parametrize("shapes", [CONSTANT_SHAPES, COMPUTED_SHAPES], ids=["constant", "computed"])
def test_removed_heads_equal_zeroed_value_columns(shapes):
    model, ws = attention(*shapes)
    small, rep = compress(model, ratio=0.0, heads=0.25)
    (row,) = rep["heads"]
    assert (row["heads"], row["kept"], row["head_dim"]) == (H, H - 1, D)
    sizes = initializer_shapes(small)
    assert sizes["wq"] == sizes["wk"] == sizes["wv"] == (C, C - D) and sizes["wo"] == (C - D, C)
    oracle = zeroed_values(model, ws, row["removed"])
    feeds = {"x": RNG.standard_normal((3, T, C)).astype(np.float32)}
    got, want, before = run(small, feeds)[0], run(oracle, feeds)[0], run(model, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - before).max() > 1e-3  # a head really went


def test_a_per_head_constant_bias_is_sliced_with_its_heads():
    bias = RNG.standard_normal((1, H, T, T)).astype(np.float32)
    model, ws = attention(*CONSTANT_SHAPES[:1], CONSTANT_SHAPES[1] | {"rel": bias},
                          score="sm = Mul (s, scale)\n        ss = Add (sm, rel)")
    small, rep = compress(model, ratio=0.0, heads=0.5)
    (row,) = rep["heads"]
    kept = [h for h in range(H) if h not in row["removed"]]
    rel = next(t for t in small.graph.initializer if t.name.startswith("rel"))
    np.testing.assert_array_equal(numpy_helper.to_array(rel), bias[:, kept])
    feeds = {"x": RNG.standard_normal((2, T, C)).astype(np.float32)}
    oracle = zeroed_values(model, ws, row["removed"])
    np.testing.assert_allclose(run(small, feeds)[0], run(oracle, feeds)[0], atol=1e-5)


def test_a_mask_that_differs_per_head_leaves_the_layer_whole():
    model, _ = attention(*CONSTANT_SHAPES, score="sm = Mul (s, scale)\n        ss = Add (sm, mask)",
                         inputs=f"float[N, {H}, {T}, {T}] mask")
    small, rep = compress(model, ratio=0.0, heads=0.5)
    assert "heads" not in rep and initializer_shapes(small)["wv"] == (C, C)
    assert any("heads left whole" in s["reason"] and "'mask' differs per head" in s["reason"] for s in rep["skipped"])


def test_a_computed_per_head_bias_behind_a_where_is_named_as_the_reason():
    """T5's relative position bias: computed once, masked by a Where whose data input is not of
    the scores' full shape, added in every layer. The reason names the bias, not the Where."""
    model, _ = attention(*CONSTANT_SHAPES, score="sm = Mul (s, scale)\n        rb = Where (keep, rel, low)\n"
                                                 "        ss = Add (sm, rb)",
                         inputs=f"bool[N, 1, {T}, {T}] keep, float[1, {H}, {T}, {T}] rel, float[1] low")
    small, rep = compress(model, ratio=0.0, heads=0.5)
    assert "heads" not in rep and initializer_shapes(small)["wv"] == (C, C)
    (reason,) = [s["reason"] for s in rep["skipped"] if "heads left whole" in s["reason"]]
    assert "'rb' differs per head and is computed" in reason, reason


# -- Gemm between Reshapes (GPT-2's Conv1D) ------------------------------------------------
def conv1d_block(back: str) -> tuple:
    ws = rng_weights(RNG, w=(6, 8)) | {"b": RNG.standard_normal(6).astype(np.float32)}
    ws |= {"flat": np.array([-1, 8], np.int64), "zero": np.array([0], np.int64), "two": np.array([2], np.int64),
           "width": np.array([6], np.int64), "rows": np.array([-1, 6], np.int64)}
    body = f"""
        f = Reshape (x, flat)
        g = Gemm <transB = 1, alpha = 0.5> (f, w, b)
        sx = Shape (x)
        nt = Slice (sx, zero, two)
        back = Concat <axis = 0> (nt, width)
        {back}"""
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 5, 8] x, {typed(ws)}) => (float[N, 5, 6] y) {{{body}
    }}"""
    from tests.helpers import build

    return build(text, ws)


def test_a_gemm_between_reshapes_becomes_a_matmul_on_the_sequence():
    model = conv1d_block("y = Reshape (g, back)")
    small, rep = compress(model, ratio=0.0)
    ops = [n.op_type for n in small.graph.node]
    assert "Gemm" not in ops and ops.count("MatMul") == 1 and rep["gemm_to_matmul"]
    feeds = {"x": RNG.standard_normal((3, 5, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(small, feeds)[0], run(model, feeds)[0], atol=1e-6)
    assert rep["params_before"] == rep["params_after"]


def test_a_gemm_whose_rows_do_not_go_back_is_left_alone():
    model = conv1d_block("r = Reshape (g, rows)\n        y = Reshape (r, back)")  # (N*T, C') is read as such
    small, rep = compress(model, ratio=0.0)
    assert "Gemm" in [n.op_type for n in small.graph.node] and "gemm_to_matmul" not in rep


def test_head_importance_and_the_value_bias_offset_on_arrays():
    from onnx_merge.math.heads import head_importance, kept_heads, value_bias_offset

    v = [np.eye(3, 2), 2 * np.eye(3, 2), 0.5 * np.eye(3, 2), 3 * np.eye(3, 2)]
    o = [np.ones((2, 4))] * 4
    imp = head_importance(v, o)
    np.testing.assert_allclose(imp, np.array([1, 2, 0.5, 3]) * np.sqrt(8))
    assert kept_heads(imp, 0.25).tolist() == [0, 1, 3] and kept_heads(imp, 0.5).tolist() == [1, 3]
    assert kept_heads(np.ones(4), 0.5).tolist() == [0, 1]  # ties keep the earlier heads
    b = [np.array([1.0, 2.0]), np.array([0.5, -1.0])]
    w = [np.arange(8.0).reshape(2, 4), np.ones((2, 4))]
    np.testing.assert_allclose(value_bias_offset(b, w), b[0] @ w[0] + b[1] @ w[1])
