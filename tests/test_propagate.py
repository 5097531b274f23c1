"""The data-free per-channel statistics (math/propagate.py, onnx_merge/statistics.py) on arrays."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_merge.math.activations import activation
from onnx_merge.math.propagate import (activation_stats, capped_keep, keep_least_costly, layer_moments, product_stats,
                                       relative_error, removal_costs)
from onnx_merge.statistics import tensor_statistics


def test_layer_moments_match_sampled_conv_and_depthwise():
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    x = mean[:, None] + np.sqrt(var)[:, None] * rng.standard_normal((200000, 4, 3))  # (samples, channels, taps), independent
    for groups, w in ((1, rng.normal(size=(5, 4, 3))), (4, rng.normal(size=(4, 1, 3)))):
        bias = rng.normal(size=len(w))
        m, v = layer_moments(mean, var, w, bias, groups)
        per_in = w.shape[1]
        block = np.repeat(np.arange(groups), len(w) // groups)
        out = np.stack([np.einsum("sct,ct->s", x[:, block[o] * per_in:(block[o] + 1) * per_in], w[o]) + bias[o]
                        for o in range(len(w))], axis=1)
        np.testing.assert_allclose(m, out.mean(0), atol=0.03)
        np.testing.assert_allclose(v, out.var(0), rtol=0.03)


def test_activation_and_product_stats_match_samples():
    rng = np.random.default_rng(1)
    mean, var = np.array([-1.0, 0.0, 2.0]), np.array([0.5, 1.0, 3.0])
    u = mean + np.sqrt(var) * rng.standard_normal((400000, 3))
    f = activation("hard_swish")
    m, v = activation_stats(f, mean, var)
    np.testing.assert_allclose(m, f(u).mean(0), atol=0.01)
    np.testing.assert_allclose(v, f(u).var(0), rtol=0.02)
    g = rng.uniform(0, 1, size=(400000, 3))
    pm, pv = product_stats(u.mean(0), u.var(0), g.mean(0), g.var(0))
    np.testing.assert_allclose(pm, (u * g).mean(0), atol=0.01)
    np.testing.assert_allclose(pv, (u * g).var(0), rtol=0.02)


def test_keep_least_costly_and_cap():
    costs = removal_costs(np.array([1.0, 1.0, 4.0, 1.0]), np.array([1.0, 0.1, 1.0, 2.0]))  # 1, 0.1, 4, 2
    np.testing.assert_array_equal(keep_least_costly(costs, 2), [2, 3])
    np.testing.assert_array_equal(keep_least_costly(costs, 2, blocks=2), [0, 2])  # one per block of two
    assert np.isclose(relative_error(costs, np.array([2, 3])), 1.1 / 7.1)
    assert capped_keep(costs, 2, 1.0) == 2  # no cap
    assert capped_keep(costs, 2, 0.2) == 2  # 1.1 / 7.1 < 0.2
    assert capped_keep(costs, 1, 0.2) == 2  # removing three costs 3.1 / 7.1: keep one more
    assert capped_keep(costs, 1, 0.01) == 4  # not even the cheapest: nothing removed
    assert capped_keep(costs, 1, 0.2, step=3) == 3  # kept counts are multiples of the step (or all)


def _net():
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(6, 3, 1, 1)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Sigmoid", ["bn"], ["s"]), helper.make_node("Mul", ["bn", "s"], ["act"]),
             helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
             helper.make_node("Conv", ["act", "w2"], ["y"])]
    inits = [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("g", gamma), ("b", beta),
                                                          ("m", np.zeros(6, np.float32)), ("v", np.ones(6, np.float32)),
                                                          ("w2", rng.normal(size=(2, 6, 1, 1)).astype(np.float32)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("pool", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph), gamma, beta


def test_statistics_read_batchnorm_and_composite_silu():
    model, gamma, beta = _net()
    stats = tensor_statistics(model)
    assert not stats["c"].anchored  # carried from the assumed input
    np.testing.assert_allclose(stats["bn"].mean, beta, rtol=1e-6)
    np.testing.assert_allclose(stats["bn"].var, gamma.astype(np.float64) ** 2, rtol=1e-6)
    silu = activation("silu")
    m, v = activation_stats(silu, beta, gamma.astype(np.float64) ** 2)
    assert stats["act"].anchored and stats["pool"].anchored  # through per-channel ops only
    np.testing.assert_allclose(stats["act"].mean, m, rtol=1e-6)
    np.testing.assert_allclose(stats["act"].var, v, rtol=1e-6)
    assert not stats["y"].anchored and len(stats["y"].mean) == 2
