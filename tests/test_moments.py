"""Activations by name and their Gaussian moments, on arrays (and the ONNX ops they name)."""

import numpy as np
import pytest

from onnx_merge.datafree import node_activation
from onnx_merge.graph import GraphIndex
from onnx_merge.math.activations import FUNCTIONS, activation
from onnx_merge.math.batchnorm import expected_relu
from onnx_merge.math.merge import relu_kernel_factor
from onnx_merge.math.moments import activation_moments, gaussian_means
from tests.helpers import build, header, run

# (ONNX op with attributes, extra constant inputs) -> the name the planner gives it
ONNX_OPS = [
    ("Relu", "", {}, "relu"), ("LeakyRelu", "<alpha = 0.2>", {}, "leaky_relu"), ("Sigmoid", "", {}, "sigmoid"),
    ("HardSigmoid", "<alpha = 0.25, beta = 0.4>", {}, "hard_sigmoid"), ("Tanh", "", {}, "tanh"),
    ("HardSwish", "", {}, "hard_swish"), ("Gelu", "", {}, "gelu"), ("Gelu", '<approximate = "tanh">', {}, "gelu_tanh"),
    ("Mish", "", {}, "mish"), ("Elu", "<alpha = 0.7>", {}, "elu"), ("Selu", "", {}, "selu"),
    ("Softplus", "", {}, "softplus"),
    ("Clip", "", {"lo": np.float32(0.0), "hi": np.float32(6.0)}, "clip"),
    ("PRelu", "", {"slope": np.array([0.3], np.float32)}, "prelu"),
]


@pytest.mark.parametrize("op,attrs,consts,name", ONNX_OPS, ids=[f"{o[0]}{o[1]}" for o in ONNX_OPS])
def test_onnx_activation_ops_are_named_and_evaluated_as_onnxruntime_does(op, attrs, consts, name):
    args = ", ".join(["x"] + list(consts))
    decl = "".join(f", float{'[1]' if v.ndim else ''} {k}" for k, v in consts.items())
    model = build(header(20) + f"""
    g (float[64] x{decl}) => (float[64] y) {{
        y = {op} {attrs} ({args})
    }}""", consts)
    x = np.linspace(-8, 8, 64).astype(np.float32)
    found = node_activation(GraphIndex(model), model.graph.node[0])
    assert found is not None and found[0] == name
    assert np.allclose(activation(*found)(x), run(model, {"x": x})[0], atol=1e-5)


def test_named_activations_keep_their_defining_identities():
    x = np.linspace(-7, 7, 301)
    assert np.allclose(activation("hard_swish")(x), x * np.clip(x + 3, 0, 6) / 6)
    assert np.allclose(activation("silu", {"beta": 1.702})(x), x / (1 + np.exp(-1.702 * x)))
    assert np.allclose(activation("clip", {"min": 0.0, "max": 6.0})(x), np.minimum(np.maximum(x, 0), 6))
    assert np.allclose(activation("gelu_tanh")(x), activation("gelu")(x), atol=1e-3)
    with pytest.raises(ValueError, match="unknown activation"):
        activation("swish2")


def test_means_match_the_closed_form_relu_and_silu_by_sampling():
    mean, std = np.array([-1.0, 0.0, 0.3, 2.0]), np.array([0.5, 1.0, 2.0, 0.0])
    assert np.allclose(gaussian_means(activation("relu"), mean, std), expected_relu(mean, std), atol=1e-4)
    z = mean + std * np.random.default_rng(0).standard_normal((400_000, 4))
    assert np.allclose(gaussian_means(activation("silu"), mean, std), activation("silu")(z).mean(0), atol=1e-2)


@pytest.mark.parametrize("rho", [0.0, -0.6, 0.5, 0.99])
def test_second_moments_match_the_arc_cosine_kernel(rho):
    cov = np.array([[1.0, 2 * rho], [2 * rho, 4.0]])
    m = activation_moments(activation("relu"), np.zeros(2), cov)
    assert m[0, 1] == pytest.approx(2 * relu_kernel_factor(np.array(rho)) / 2, rel=5e-4)
    assert m[0, 0] == pytest.approx(0.5, rel=1e-4) and m[1, 1] == pytest.approx(2.0, rel=1e-4)
    assert m[2, 0] == pytest.approx(1 / np.sqrt(2 * np.pi), rel=1e-4) and m[2, 2] == 1.0


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_moment_matrices_match_sampling_and_are_positive_semidefinite(name):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 3))
    a[1] = 1.02 * a[0]  # a near-duplicate: correlation close to 1, where the series is weakest
    cov, mean = a @ a.T, rng.standard_normal(5)
    f = activation(name, {"min": -1.0, "max": 2.0} if name == "clip" else {})
    m = activation_moments(f, mean, cov)
    z = mean + rng.standard_normal((400_000, 3)) @ a.T
    acts = np.hstack([f(z), np.ones((len(z), 1))])
    sampled = acts.T @ acts / len(z)
    assert np.allclose(m, sampled, atol=1e-2 * np.abs(sampled).max())
    assert np.linalg.eigvalsh(m).min() > -1e-9 * np.abs(m).max()


def test_depthwise_outputs_have_the_modelled_moments():
    """Inputs correlated across channels but independent across positions: a depthwise conv's outputs
    keep each channel's mean times its filter sum, and covariances C_cd <k_c, k_d>."""
    from onnx_merge.math.regress import depthwise_preactivations

    rng = np.random.default_rng(2)
    mix = rng.standard_normal((3, 3))
    mean, cov = np.array([1.0, -0.5, 0.2]), mix @ mix.T
    filters, bias = rng.standard_normal((3, 9)), rng.standard_normal(3)
    field = mean + rng.standard_normal((20000, 3, 3, 3)).transpose(0, 2, 3, 1) @ mix.T  # (B, 3, 3, C)
    out = np.einsum("bhwc,chw->bc", field, filters.reshape(3, 3, 3)) + bias  # one 3x3 window per sample
    m, c = depthwise_preactivations(mean, cov, filters, bias)
    assert np.allclose(m, out.mean(0), atol=4 * np.sqrt(np.diag(c).max() / len(out)))  # four standard errors
    assert np.allclose(c, np.cov(out.T), atol=0.05 * np.abs(c).max())
