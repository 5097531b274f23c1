"""The data-free regression method: its model on arrays, and what it buys on a real network."""

import numpy as np
import pytest

from onnx_merge import CompressOptions, compress
from onnx_merge.math.batchnorm import expected_relu
from onnx_merge.math.merge import duplicate_of
from onnx_merge.math.regress import (activation_moments, consumer_metric_root, input_channel_variances,
                                     kernel_moments, regress_plan, sample_activations)
from tests.helpers import build, header, run
from tests.test_resnet import CIFAR


def test_input_channel_variances_recover_a_planted_input_covariance():
    rng = np.random.default_rng(0)
    filters = rng.standard_normal((12, 3, 9))
    s = np.array([0.5, 2.0, 0.0])
    variances = (filters ** 2).sum(axis=2) @ s
    assert np.allclose(input_channel_variances(filters, variances), s, atol=1e-8)


def test_sampled_activations_have_the_gaussian_relu_mean():
    mean, std = np.array([0.5, -1.0]), np.array([1.0, 2.0])
    acts = sample_activations(mean, np.diag(std ** 2), samples=200_000)
    assert np.allclose(acts.mean(axis=0), expected_relu(mean, std), rtol=2e-2)
    leaky = sample_activations(mean, np.diag(std ** 2), slope=0.1, samples=1000)
    assert (leaky < 0).any()


def test_duplicates_and_exact_regression():
    rows = np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 1.0], [-1.0, -2.0]])
    assert duplicate_of(rows).tolist() == [-1, 0, -1, -1]
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.standard_normal((5000, 3)), 0)
    acts = np.hstack([acts, 3.0 * acts[:, :1]])  # channel 3 = 3 x channel 0
    consumer = rng.standard_normal((4, 5))
    comp = regress_plan(activation_moments(acts), 3, consumer_metric_root(consumer), ridge=1e-9, candidates=np.arange(3))
    assert comp.kept.tolist() == [0, 1, 2]
    assert np.allclose(comp.dense[:, 0], [3.0, 0.0, 0.0], atol=1e-6) and abs(comp.offset[3]) < 1e-6


@pytest.mark.parametrize("slope", [0.0, 0.3])
def test_kernel_moments_are_the_white_input_moments(slope):
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((5, 4))
    rows[3] = -0.5 * rows[0]  # an opposite row: the terms in relu(-b) matter
    g = rng.standard_normal((400_000, 4))
    z = g @ rows.T
    acts = np.where(z > 0, z, slope * z)
    sampled = acts.T @ acts / len(g)
    moments = kernel_moments(rows, slope)
    assert np.allclose(moments[:5, :5], sampled, atol=0.02 * np.abs(sampled).max())
    assert moments[5, 5] == 1.0 and not moments[5, :5].any()  # no mean: no intercept is fitted


def test_kernel_regress_fits_a_dense_layer_better_than_merging_where_its_model_holds():
    """Bias-free layers fed white Gaussian inputs are the kernel model exactly: regressing each removed
    neuron on all kept ones must reproduce the consumer's output better than one merge partner each."""
    rng = np.random.default_rng(3)
    ws = {"w1": rng.standard_normal((24, 16)).astype(np.float32), "w2": rng.standard_normal((6, 24)).astype(np.float32)}
    text = header() + """
    g (float[N, 16] x, float[24, 16] w1, float[6, 24] w2) => (float[N, 6] y) {
        h = Gemm <transB = 1> (x, w1)
        r = Relu (h)
        y = Gemm <transB = 1> (r, w2)
    }"""
    model = build(text, ws)
    feeds = {"x": rng.standard_normal((4000, 16)).astype(np.float32)}
    reference = run(model, feeds)[0]
    errors = {}
    for method in ("regress", "merge"):
        small, rep = compress(model, CompressOptions(ratio=0.5, method=method))
        assert rep["layers"][0]["method"] == method
        errors[method] = float(np.mean((run(small, feeds)[0] - reference) ** 2))
    assert errors["regress"] < 0.8 * errors["merge"]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_regress_beats_the_authors_merge_on_bn_kept_resnet(paper_weights, cifar, ratio):
    from onnx_merge.evaluate import evaluate
    from onnx_merge.models.resnet import resnet_paper

    model = resnet_paper(paper_weights, fold=False)
    x, y = cifar["x_exact"][:400], cifar["y"][:400]

    def acc(**kw):
        small = compress(model, CompressOptions(ratio=ratio, **kw))[0]
        return evaluate(small.SerializeToString(), x, y, CIFAR, progress=False)["top1"]

    authors = acc(method="merge", bn_rule="lambda", scale_rule="paper")
    assert acc() > authors + 0.02  # the default (regress) clears the authors' formula by 2 points or more


def test_predicted_error_is_the_error_on_samples_of_the_model():
    """The plan's predicted output error is what it makes on activations drawn from its own model."""
    from onnx_merge.math.regress import model_moments, predicted_error

    rng = np.random.default_rng(4)
    a = rng.standard_normal((10, 4))
    mean, cov = rng.standard_normal(10), a @ a.T
    gram = model_moments("gelu", {}, mean, cov)
    consumer = rng.standard_normal((10, 3))
    metric = consumer_metric_root(consumer)
    comp = regress_plan(gram, 5, metric)
    error, relative = predicted_error(gram, comp, metric)
    z = mean + rng.standard_normal((200_000, 4)) @ a.T
    acts = 0.5 * z * (1 + __import__("scipy").special.erf(z / np.sqrt(2)))
    rebuilt = acts.copy()
    rebuilt[:, comp.removed] = acts[:, comp.kept] @ comp.dense + comp.offset[comp.removed]
    measured = np.mean(np.sum(((acts - rebuilt) @ consumer) ** 2, axis=1))
    assert error == pytest.approx(measured, rel=0.03)
    assert relative == pytest.approx(measured / np.trace(consumer.T @ np.cov(acts.T) @ consumer), rel=0.03)


FFN = """
    g (float[N, 8, 32] x, float[32] g, float[32] be, float[32, 96] w1, float[96] b1, float[96, 32] w2, float[32] b2)
      => (float[N, 8, 32] y) {{
        n = LayerNormalization <axis = -1> (x, g, be)
        h = MatMul (n, w1)
        hb = Add (h, b1)
        a = {act} (hb)
        o = MatMul (a, w2)
        y = Add (o, b2)
    }}"""


@pytest.mark.parametrize("act", ["Gelu", "Tanh", "HardSwish", "Sigmoid"])
def test_regress_compensates_a_layernorm_ffn_through_any_activation(act):
    """A token FFN after a LayerNorm: its affine parameters give the input model, the activation is
    named, and the removed neurons regressed on the kept ones (plus their means) beat pruning by far
    where the model holds (hidden neurons that share a low-rank input subspace)."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((96, 12)) @ rng.standard_normal((12, 32)) / np.sqrt(12 * 32) * 1.5
    ws = {"g": 1 + 0.3 * rng.standard_normal(32), "be": 0.3 * rng.standard_normal(32), "w1": w1.T,
          "b1": 0.5 * rng.standard_normal(96), "w2": rng.standard_normal((96, 32)) / np.sqrt(96), "b2": np.zeros(32)}
    model = build(header(20) + FFN.format(act=act), {k: np.asarray(v, np.float32) for k, v in ws.items()})
    feeds = {"x": (2 * rng.standard_normal((300, 8, 32)) + 1).astype(np.float32)}
    reference = run(model, feeds)[0]
    errors = {}
    for method in ("prune", "regress"):
        small, rep = compress(model, CompressOptions(ratio=0.5, method=method))
        errors[method] = float(np.mean((run(small, feeds)[0] - reference) ** 2) / np.var(reference))
    entry = rep["layers"][0]
    assert entry["method"] == "regress" and entry["regressed"] == 48
    assert errors["regress"] < 0.25 * errors["prune"]
    assert 0.2 < entry["predicted_error"] / errors["regress"] < 5  # the model's own estimate: the right order


def test_pruned_hardswish_chain_after_a_kept_bn_gets_the_removed_means():
    """Conv -> BN -> HardSwish -> Conv with BN kept: the BN statistics model the activations; both
    the regression and (where regress cannot run, e.g. --method prune --bias-from-bn) the means
    E[f(z)], z ~ N(beta, gamma^2), of the removed channels reduce the error against plain pruning."""
    rng = np.random.default_rng(6)
    n = 16
    w1 = rng.standard_normal((n, 3, 3, 3)).astype(np.float32)
    ws = {"w1": w1, "gamma": (0.5 + rng.random(n)).astype(np.float32), "beta": (rng.standard_normal(n) + 1).astype(np.float32),
          "mean": rng.standard_normal(n).astype(np.float32), "var": (1 + rng.random(n)).astype(np.float32),
          "w2": (rng.standard_normal((4, n, 1, 1)) / 4).astype(np.float32)}
    model = build(header() + f"""
    g (float[N, 3, 8, 8] x, float[{n}, 3, 3, 3] w1, float[{n}] gamma, float[{n}] beta, float[{n}] mean, float[{n}] var,
       float[4, {n}, 1, 1] w2) => (float[N, 4, 6, 6] y) {{
        h = Conv (x, w1)
        b = BatchNormalization (h, gamma, beta, mean, var)
        a = HardSwish (b)
        y = Conv (a, w2)
    }}""", ws)
    feeds = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    reference = run(model, feeds)[0]

    def error(**kw):
        small, rep = compress(model, CompressOptions(ratio=0.5, fold_bn=False, round_to=1, **kw))
        return float(np.mean((run(small, feeds)[0] - reference) ** 2)), rep["layers"][0]

    plain, _ = error(method="prune")
    means, entry = error(method="prune", bias_from_bn=True)
    regressed, entry = error()
    assert entry["method"] == "regress" and "predicted_error" in entry
    assert means < 0.7 * plain and regressed < means


def test_the_graph_gives_a_layernorm_input_model_and_one_named_activation():
    from onnx_merge.datafree import chain_activation, input_model
    from onnx_merge.graph import GraphIndex
    from onnx_merge.groups import find_chains

    rng = np.random.default_rng(7)
    ws = {"g": rng.random(32) + 0.5, "be": rng.standard_normal(32), "w1": rng.standard_normal((32, 96)),
          "b1": rng.standard_normal(96), "w2": rng.standard_normal((96, 32)), "b2": np.zeros(32)}
    model = build(header(20) + FFN.format(act="Gelu"), {k: np.asarray(v, np.float32) for k, v in ws.items()})
    index = GraphIndex(model)
    (chain,), _ = find_chains(index)
    assert chain_activation(index, chain) == ("gelu", {})
    inputs = input_model(index, chain.producer)
    assert inputs.source == "layernorm" and np.allclose(inputs.mean, ws["be"]) and np.allclose(inputs.var, ws["g"] ** 2)
    two = build(header(20) + FFN.format(act="Tanh").replace("a = Tanh (hb)", "t = Tanh (hb)\n        a = Sigmoid (t)"),
                {k: np.asarray(v, np.float32) for k, v in ws.items()})
    index = GraphIndex(two)
    (chain,), _ = find_chains(index)
    assert chain_activation(index, chain) is None  # two activations: no one function to model
