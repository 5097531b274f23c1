"""Transformer forms: shared biases, attention heads, feed-forward blocks (onnx.parser graphs)."""

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
