"""Global budgets: --target-macs / --target-params allocated where removing channels costs least."""

import json

import numpy as np
import pytest

from onnx_merge import CompressOptions, compress
from onnx_merge.cli import main
from onnx_merge.data import Preprocess
from onnx_merge.errors import UsageError
from onnx_merge.evaluate import evaluate
from onnx_merge.math import Compensation
from onnx_merge.math.budget import BudgetGroup, BudgetTerm, allocate, allowed_counts, spend
from onnx_merge.math.regress import kernel_moments
from onnx_merge.math.sensitivity import plan_error
from onnx_merge.models.lenet import lenet_300_100
from onnx_merge.models.resnet import resnet_paper

from .conftest import shared_file
from .helpers import build, header, run

D, N, M = 24, 16, 12
FASHION = Preprocess(255, (0.5,), (0.5,))
CIFAR = Preprocess(255, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "nhwc")


def two_branches(seed: int = 0):
    """x -> A1 -> Relu -> A2 and x -> B1 -> Relu -> B2, equal MACs; A1's second half of rows
    are positive multiples of its first half (removing them costs nothing), B1's are random."""
    rng = np.random.default_rng(seed)
    a1 = rng.standard_normal((N // 2, D)).astype(np.float32)
    a1 = np.vstack([a1, a1 * rng.uniform(0.5, 2.0, (N // 2, 1)).astype(np.float32)])
    return branch_pair({"A1": a1, "B1": rng.standard_normal((N, D)), "A2": rng.standard_normal((M, N)),
                        "B2": rng.standard_normal((M, N))})


def branch_pair(weights: dict, batch: str = "1"):
    """x -> A1 -> Relu -> A2 and x -> B1 -> Relu -> B2 with the given weights, nodes named by their outputs."""
    weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    text = header() + f"""
    g (float[{batch}, 24] x) => (float[{batch}, 12] ya, float[{batch}, 12] yb) {{
        ha = Gemm <transB = 1> (x, A1)
        ra = Relu (ha)
        ya = Gemm <transB = 1> (ra, A2)
        hb = Gemm <transB = 1> (x, B1)
        rb = Relu (hb)
        yb = Gemm <transB = 1> (rb, B2)
    }}"""
    model = build(text, weights)
    for node in model.graph.node:
        node.name = node.output[0]
    return model


def kept(report: dict) -> dict[str, int]:
    return {g["layer"]: g["kept"] for g in report["allocation"]["groups"]}


def test_budget_goes_to_the_redundant_layer_and_is_met_exactly():
    model = two_branches()
    small, report = compress(model, CompressOptions(target_macs=0.75))
    # half of one branch is a quarter of the MACs: exactly the duplicates of A1
    assert kept(report) == {"ha": N // 2, "hb": N}
    assert report["macs_after"] == 0.75 * report["macs_before"]
    x = np.random.default_rng(1).standard_normal((1, D)).astype(np.float32)
    (ya, yb), (sa, sb) = run(model, {"x": x}), run(small, {"x": x})
    np.testing.assert_allclose(sa, ya, rtol=1e-4, atol=1e-4)  # exact merges
    np.testing.assert_array_equal(sb, yb)


@pytest.mark.parametrize("target", [0.9, 0.62, 0.41, 0.13])
def test_target_met_to_one_channel(target):
    _, report = compress(two_branches(), CompressOptions(target_macs=target))
    one_channel = D + M  # MACs of one hidden channel: its row of the producer, its column of the consumer
    assert report["macs_after"] <= target * report["macs_before"]
    assert report["macs_after"] > target * report["macs_before"] - one_channel
    assert min(kept(report).values()) >= 1


def test_pinned_and_excluded_layers_stay_as_given():
    _, report = compress(two_branches(), CompressOptions(target_macs=0.75, layer_ratios=[("ha", 0.0)]))
    assert kept(report)["ha"] == N and report["allocation"]["groups"][0]["pinned"]
    assert kept(report)["hb"] == N // 2  # the budget had to come from B
    _, report = compress(two_branches(), CompressOptions(target_macs=0.75, layer_ratios=[("A1", 0.25)]))
    assert kept(report)["ha"] == 12  # pinned by the weight's name
    _, report = compress(two_branches(), CompressOptions(target_macs=0.8, exclude=["hb"]))
    assert list(kept(report)) == ["ha"]
    assert not any(r["layer"] == "hb" for r in report["layers"])


def test_unreachable_and_contradictory_targets_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="cannot be met"):
        compress(two_branches(), CompressOptions(target_macs=0.01))
    with pytest.raises(UsageError, match="exclude each other"):
        compress(two_branches(), CompressOptions(target_macs=0.5, target_params=0.5))
    with pytest.raises(UsageError, match=r"in \(0, 1\]"):
        compress(two_branches(), CompressOptions(target_params=1.5))


def test_round_to_and_one_channel_minimum():
    assert allowed_counts(10, 4).tolist() == [10, 8, 4]
    assert allowed_counts(5).tolist() == [5, 4, 3, 2, 1]
    assert allowed_counts(40, 8, floor=16).tolist() == [40, 32, 24, 16]
    groups = [BudgetGroup(np.linspace(0, 1, 10)), BudgetGroup(np.linspace(0, 2, 12))]
    terms = [BudgetTerm(100.0, (0,)), BudgetTerm(120.0, (1,))]
    keeps = allocate(groups, terms, 120.0, round_to=4)  # at most 60 + 80
    assert all(k % 4 == 0 for k in keeps) and spend(terms, groups, [10, 12]) - spend(terms, groups, keeps) >= 120


def test_shared_layers_are_counted_once():
    """A layer between two groups shrinks with both (LeNet's middle layer): the spend is bilinear."""
    groups = [BudgetGroup(np.zeros(10)), BudgetGroup(np.zeros(4))]
    terms = [BudgetTerm(10 * 4.0, (0, 1)), BudgetTerm(4 * 2.0, (1,))]
    assert spend(terms, groups, [5, 2]) == pytest.approx(10 + 4)
    keeps = allocate(groups, terms, 30.0)
    assert 48 - spend(terms, groups, keeps) >= 30


def test_cheap_channels_behind_a_dear_one_are_found():
    """Non-convex curve: the first removal is dear, the next ones free; averaged over them it wins."""
    dear_then_free = np.r_[0.0, np.full(7, 0.3)]
    steady = np.arange(8) * 0.1
    keeps = allocate([BudgetGroup(dear_then_free), BudgetGroup(steady)],
                     [BudgetTerm(8.0, (0,)), BudgetTerm(8.0, (1,))], 5.0)
    assert keeps == [3, 8]


def test_plan_error_is_zero_for_exact_merges_and_counts_what_pruning_drops():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 5))
    rows = np.vstack([rows, 2 * rows[:1]])  # channel 3 = 2 x channel 0
    gram = kernel_moments(rows)
    metric = np.eye(4)
    merged = Compensation.prune(4, np.arange(3))
    merged.partner[3], merged.scale[3] = 0, 2.0
    assert plan_error(gram, metric, merged) == pytest.approx(0.0, abs=1e-9)
    assert plan_error(gram, metric, Compensation.prune(4, np.arange(3))) == pytest.approx(gram[3, 3])


def test_cli_reports_the_allocation_and_sensitivity_draws_curves(tmp_path, capsys):
    model_path = tmp_path / "m.onnx"
    import onnx

    onnx.save(two_branches(), model_path)
    report = tmp_path / "r.json"
    assert main(["compress", str(model_path), "-o", str(tmp_path / "s.onnx"), "--target-params", "0.8",
                 "--report", str(report), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "allocation:" in out and "predicted error" in out
    groups = json.loads(report.read_text())["details"]["allocation"]["groups"]
    assert {g["layer"] for g in groups} == {"ha", "hb"} and all(0 <= g["ratio"] < 1 for g in groups)
    with pytest.raises(SystemExit) as usage:
        main(["compress", str(model_path), "-o", str(tmp_path / "s.onnx"), "--target-macs", "0.5", "--ratio", "0.5"])
    assert usage.value.code == 2
    curves, plot = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["sensitivity", str(model_path), "--report", str(curves), "--plot", str(plot)]) == 0
    result = json.loads(curves.read_text())
    by_layer = {g["layer"]: g for g in result["details"]["groups"]}
    assert len(by_layer["ha"]["curve"]) == N
    assert max(by_layer["ha"]["curve"][:N // 2 + 1]) < 1e-6 < by_layer["hb"]["curve"][1]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_lenet_quarter_of_the_parameters(lenet_weights, fashion_test):
    small, report = compress(lenet_300_100(lenet_weights), CompressOptions(target_params=0.25))
    assert report["params_after"] <= 0.25 * report["params_before"]
    top1 = evaluate(small.SerializeToString(), fashion_test["x"], fashion_test["y"], FASHION, progress=False)["top1"]
    assert 100 * top1 >= 87.2  # uniform 0.7 keeps 27.6 % at 86.94


@pytest.mark.slow
def test_resnet56_half_the_macs_data_free(paper_weights, cifar):
    small, report = compress(resnet_paper(paper_weights, fold=True), CompressOptions(target_macs=0.5))
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    top1 = evaluate(small.SerializeToString(), cifar["x_exact"], cifar["y"][:1017], CIFAR, progress=False)["top1"]
    assert 100 * top1 >= 57.0  # uniform 0.5: 48.77


def test_consumer_curves_with_calibration_are_scaled_by_the_branch_share_of_its_stream():
    rng = np.random.default_rng(3)
    weights = {"A1": rng.standard_normal((N, D)).astype(np.float32),
               "A2": (0.1 * rng.standard_normal((D, N))).astype(np.float32)}
    text = header() + """
    g (float[1, 24] x) => (float[1, 24] y) {
        h = Gemm <transB = 1> (x, A1)
        r = Relu (h)
        branch = Gemm <transB = 1> (r, A2)
        y = Add (x, branch)
    }"""
    model = build(text, weights)
    x = rng.standard_normal((200, D)).astype(np.float32)
    branch = np.maximum(x @ weights["A1"].T, 0) @ weights["A2"].T
    share = np.sum(branch.astype(np.float64) ** 2) / np.sum((x + branch).astype(np.float64) ** 2)
    from onnx_merge.allocation import sensitivity

    free = sensitivity(model, CompressOptions(sensitivity="consumer"))["groups"][0]
    calibrated = sensitivity(model, CompressOptions(sensitivity="consumer", calibration={"x": x}))["groups"][0]
    assert free["stream_share"] is None
    assert calibrated["stream_share"] == pytest.approx(share, rel=1e-4)
    np.testing.assert_allclose(calibrated["curve"], np.array(free["curve"]) * share, rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_resnet56_half_the_macs_calibrated(paper_weights, cifar):
    shared_calibration = {"input": CIFAR(np.load(shared_file("data", "cifar10_calib.npz"))["x"])}
    small, report = compress(resnet_paper(paper_weights, fold=True),
                             CompressOptions(target_macs=0.5, calibration=shared_calibration))
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    top1 = evaluate(small.SerializeToString(), cifar["x_exact"], cifar["y"][:1017], CIFAR, progress=False)["top1"]
    assert 100 * top1 >= 89.7  # uniform 0.5: 88.20


def stream_and_alone(stream_scale: float = 100.0, seed: int = 4):
    """Two branches with the same weights (the same consumer-relative curves, equal MACs): A's
    consumer output is added to a stream ``stream_scale`` times the input (about 50 times the
    branch in energy), B's is an output alone."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal((D, N)).astype(np.float32)
    weights = {"A1": w1, "A2": w2, "B1": w1.copy(), "B2": w2.copy(), "S": np.float32(stream_scale)}
    text = header() + """
    g (float[8, 24] x) => (float[8, 24] ya, float[8, 24] yb) {
        ha = Gemm <transB = 1> (x, A1)
        ra = Relu (ha)
        ba = Gemm <transB = 1> (ra, A2)
        s = Mul (x, S)
        ya = Add (s, ba)
        hb = Gemm <transB = 1> (x, B1)
        rb = Relu (hb)
        yb = Gemm <transB = 1> (rb, B2)
    }"""
    model = build(text, weights)
    for node in model.graph.node:
        node.name = node.output[0]
    return model


def test_output_curves_see_a_branch_diluted_in_its_stream():
    """The consumer-relative model cannot tell the branches apart; measured at the outputs, the
    branch hidden in a stream much larger than itself is the cheap one and the budget goes there."""
    from onnx_merge.allocation import sensitivity

    model = stream_and_alone()
    consumer = {g["layer"]: g["curve"] for g in sensitivity(model, CompressOptions(sensitivity="consumer"))["groups"]}
    np.testing.assert_allclose(consumer["ha"], consumer["hb"], rtol=1e-6)
    output = {g["layer"]: g for g in sensitivity(model, CompressOptions())["groups"]}
    assert output["ha"]["measured_on"] == "synthetic"
    assert 0 < 20 * output["ha"]["curve"][N // 2] < output["hb"]["curve"][N // 2]
    _, report = compress(model, CompressOptions(target_macs=0.75))
    assert kept(report)["ha"] < kept(report)["hb"] == N
    assert report["allocation"]["sensitivity"] == "output"


def test_output_curve_is_zero_for_exact_merges_and_matches_a_rewrite():
    """The probe's rebuilt channels are what the rewrite computes: removing A1's duplicates
    changes nothing, and a plan's measured change equals that of the compressed model."""
    from onnx_merge.allocation import OutputProbe, budget_chains
    from onnx_merge.graph import GraphIndex
    from onnx_merge.math.sensitivity import output_change

    model = two_branches()
    index = GraphIndex(model)
    options = CompressOptions(method="merge")
    chains = budget_chains(index, options)
    probe = OutputProbe.build(index, chains, options)
    a, b = (next(i for i, c in enumerate(chains) if c.name == name) for name in ("ha", "hb"))
    assert probe.change({a: N // 2}) == pytest.approx(0.0, abs=1e-9)
    small, _ = compress(model, CompressOptions(method="merge", ratio=0.0, layer_ratios=[("hb", 0.25)]))
    feeds = probe.feeds
    got = np.concatenate([np.concatenate(run(small, {"x": feeds["x"][i:i + 1]}), axis=1) for i in range(len(feeds["x"]))])
    ref = np.concatenate([np.concatenate(run(model, {"x": feeds["x"][i:i + 1]}), axis=1) for i in range(len(feeds["x"]))])
    expected = output_change([got[:, :M], got[:, M:]], [ref[:, :M], ref[:, M:]])
    assert expected > 1e-3
    assert probe.change({b: N - N // 4}) == pytest.approx(expected, rel=1e-3)


def test_inputs_noise_cannot_stand_for_fall_back_to_consumer_curves():
    from onnx_merge.allocation import probe_inputs

    text = header() + """
    g (int64[1, 4] ids, float[N, 24] x) => (float[N, 12] y) {
        h = Gemm <transB = 1> (x, A1)
        r = Relu (h)
        y = Gemm <transB = 1> (r, A2)
    }"""
    rng = np.random.default_rng(0)
    model = build(text, {"A1": rng.standard_normal((N, D)).astype(np.float32),
                         "A2": rng.standard_normal((M, N)).astype(np.float32)})
    assert probe_inputs(model, None) is None


def test_a_budget_that_needs_convs_below_a_block_lifts_the_auto_floor(monkeypatch):
    """--round-to auto keeps a block-wide conv at a block; a MAC target that needs less still holds."""
    import onnx_merge.runtime as runtime

    monkeypatch.setattr(runtime, "_cpu_conv_block", lambda: 16)  # as on an AVX-512 machine
    rng = np.random.default_rng(0)
    weights = {"c1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
               "c2": rng.standard_normal((8, 16, 3, 3)).astype(np.float32)}
    model = build(header() + """
    g (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, c1)
        r = Relu (h)
        y = Conv <pads = [1, 1, 1, 1]> (r, c2)
    }""", weights)
    for node in model.graph.node:
        node.name = node.output[0]
    assert compress(model, CompressOptions(ratio=0.5))[1]["macs_after"] == compress(model, ratio=0.0)[1]["macs_after"]
    small, rep = compress(model, CompressOptions(target_macs=0.5, sensitivity="consumer"))
    assert rep["macs_after"] <= 0.5 * rep["macs_before"] and rep["allocation"]["block_floor"] is False


def test_calibrated_curves_rebuild_channels_as_the_refit_sees_them():
    """Half of B1's channels never fire on the calibration inputs (positive x, negative rows):
    refitted on those activations they cost nothing, which the data-free plan, seeing centred
    inputs, cannot know. The calibrated curve says so, and the budget goes there."""
    from onnx_merge.allocation import sensitivity
    from onnx_merge.math.sensitivity import measured_moments

    rng = np.random.default_rng(1)
    weights = {"A1": rng.standard_normal((N, D)), "A2": rng.standard_normal((M, N)),
               "B1": np.vstack([np.abs(rng.standard_normal((N // 2, D))), -np.abs(rng.standard_normal((N // 2, D)))]),
               "B2": rng.standard_normal((M, N))}
    model = branch_pair(weights, batch="N")
    cal = {"x": np.abs(rng.standard_normal((64, D))).astype(np.float32)}
    free = {g["layer"]: g["curve"] for g in sensitivity(model, CompressOptions())["groups"]}
    fitted = {g["layer"]: g["curve"] for g in sensitivity(model, CompressOptions(calibration=cal))["groups"]}
    assert free["hb"][N // 2] > 1e-2
    assert fitted["hb"][N // 2] < 1e-6 < fitted["ha"][N // 2]
    _, report = compress(model, CompressOptions(target_macs=0.75, calibration=cal))
    assert kept(report)["hb"] == N // 2 and kept(report)["ha"] == N
    # the moments themselves: channels on any axis, a constant 1 appended
    acts = rng.standard_normal((5, 3, 4))
    gram = measured_moments(acts, 1)
    flat = np.moveaxis(acts, 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(gram[:3, :3], flat.T @ flat / len(flat))
    np.testing.assert_allclose(gram[3], np.r_[flat.mean(axis=0), 1.0])


def test_data_free_budgets_on_bn_layers_combine_synthetic_inputs_with_the_plans_prediction():
    """--sensitivity auto with --calibration none: the geometric mean of the curve measured on
    synthetic inputs and the predicted one where every layer has BN statistics; the measured curve
    alone without BN, and the calibration curve alone with data (synthetic images by default)."""
    from onnx_merge.allocation import sensitivity

    from .test_passes import conv_bn_relu_pool_conv

    def rated(model, how, **kw):
        group = sensitivity(model, CompressOptions(sensitivity=how, **{"calibration": "none", **kw}))["groups"][0]
        return np.array(group["curve"]), group["measured_on"]

    bn = conv_bn_relu_pool_conv(with_bn=True)
    (auto, on), (output, _), (consumer, _) = (rated(bn, how) for how in ("auto", "output", "consumer"))
    assert on == "synthetic x predicted" and output[-1] > 0 and consumer[-1] > 0
    np.testing.assert_allclose(auto, np.sqrt(output * consumer), atol=2e-6)  # curves as reported: 6 places
    np.testing.assert_array_equal(rated(bn, "combined")[0], auto)
    plain = conv_bn_relu_pool_conv(with_bn=False)
    np.testing.assert_array_equal(rated(plain, "auto")[0], rated(plain, "output")[0])
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    calibrated, on = rated(bn, "auto", calibration={"x": x})
    assert on == "calibration"
    np.testing.assert_array_equal(calibrated, rated(bn, "output", calibration={"x": x})[0])
    assert rated(bn, "auto", calibration=None)[1] == "synthetic"  # by default: output, on synthetic images


def test_output_curves_probe_a_conv_before_a_reduction_that_drops_its_spatial_axes():
    # torchvision MNASNet's head: Conv -> Relu -> x.mean([2, 3]) -> Gemm. The probe's map goes
    # in on the 4-D tensor; after the ReduceMean the channels are on axis 1 of a 2-D one.
    rng = np.random.default_rng(0)
    model = build(header(18) + """
        agraph (float[1, 8, 6, 6] x) => (float[1, 4] y) {
            a = Conv(x, w1, b1)
            r = Relu(a)
            m = ReduceMean<keepdims = 0>(r, axes)
            y = Gemm<transB = 1>(m, w2, b2)
        }""", {"w1": rng.standard_normal((16, 8, 1, 1)).astype(np.float32),
               "b1": rng.standard_normal(16).astype(np.float32),
               "axes": np.array([2, 3], dtype=np.int64),
               "w2": rng.standard_normal((4, 16)).astype(np.float32),
               "b2": np.zeros(4, np.float32)})
    out, report = compress(model, CompressOptions(target_macs=0.8, sensitivity="output"))
    assert report["macs_after"] <= 0.8 * report["macs_before"]
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    assert run(out, {"x": x})[0].shape == (1, 4)


def test_macs_of_layers_behind_a_pad_sized_at_run_time_are_measured_not_counted_as_one_pixel():
    """timm's tf_* nets pad by sizes computed from the input's Shape (Ceil, Max...), which onnx's
    shape inference cannot follow: the feature maps behind the Pad are unsized, and counting
    their unknown dims as 1 undercounted EfficientNetV2-B0 nine-fold. One run sizes them, and a
    budget in MACs is taken of the true count."""
    from onnx_merge.shapes import inferred_dims
    from onnx_merge.stats import count_macs

    from .test_passes import make, rng_weights

    ws = rng_weights(np.random.default_rng(0), w1=(4, 3, 3, 3), w2=(2, 4, 1, 1))
    ws.update(two=np.array(2.0, np.float32), idx=np.array([2], np.int64), zeros=np.zeros(2, np.int64))
    body = """s = Shape (x)
        h = Gather <axis = 0> (s, idx)
        hf = Cast <to = 1> (h)
        half = Div (hf, two)
        up = Ceil (half)
        p = Cast <to = 7> (up)
        pads = Concat <axis = 0> (zeros, p, p, zeros, p, p)
        xp = Pad (x, pads)
        c = Conv <kernel_shape = [3, 3]> (xp, w1)
        r = Relu (c)
        y = Conv (r, w2)"""
    model = make(body, "float[1, 3, 8, 8] x", "float[1, 2, 14, 14] y", ws)
    assert None in inferred_dims(model)["c"]  # what makes the run needed
    assert count_macs(model) == (3 * 9 * 4 + 4 * 2) * 14 * 14
    _, report = compress(model, CompressOptions(target_macs=0.5))
    assert report["macs_before"] == (3 * 9 * 4 + 4 * 2) * 14 * 14
    assert report["macs_after"] <= 0.5 * report["macs_before"]
