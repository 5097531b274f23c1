"""Calibrated compensation: exact where merging is exact, never worse than merge on its data."""

import numpy as np
import pytest

from onnx_merge import CompressOptions, compress
from onnx_merge.math.calibrate import LeastSquaresFit, im2col, same_pads
from tests.helpers import build, header, initializer_shapes, rng_weights, run
from tests.test_passes import conv_bn_relu_pool_conv


def reconstruction_error(x, y, w, b) -> float:
    return float(np.mean((x @ w.T + b - y) ** 2))


@pytest.mark.parametrize("spatial", [(11,), (7, 6), (5, 6, 4)])
def test_im2col_matches_onnxruntime_conv_in_any_rank(spatial):
    """Conv1d and Conv3d consumers are refitted too: the patches must match the runtime's Conv
    with asymmetric pads, strides and dilations."""
    import onnx
    import onnxruntime as ort

    d = len(spatial)
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2, 3) + spatial).astype(np.float32)
    w = rng.standard_normal((4, 3) + (3,) * d).astype(np.float32)
    strides, dilations, pads = [2, 1, 1][:d], [1, 2, 1][:d], [1, 0, 2][:d] + [0, 2, 1][:d]
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], strides=strides, dilations=dilations, pads=pads)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, x.shape)],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)],
                                   [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cols = im2col(x, [3] * d, strides, pads, dilations)
    out = np.moveaxis((cols @ w.reshape(4, -1).T).reshape((2,) + ref.shape[2:] + (4,)), -1, 1)
    assert np.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_same_pads_match_onnxruntime(auto_pad):
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    w = rng.standard_normal((3, 2, 4, 3)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 3], auto_pad=auto_pad)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, x.shape)],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)],
                                   [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cols = im2col(x, [4, 3], [2, 3], same_pads([7, 8], [4, 3], [2, 3], [1, 1], auto_pad), [1, 1])
    out = np.moveaxis((cols @ w.reshape(3, -1).T).reshape((1,) + ref.shape[2:] + (3,)), -1, 1)
    assert np.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_fit_never_worse_than_a_given_solution(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 6))
    y = x @ rng.standard_normal((6, 3)) + 0.1 * rng.standard_normal((200, 3))
    fit = LeastSquaresFit(6, 3)
    fit.add(x[:100], y[:100])
    fit.add(x[100:], y[100:])
    w, b = fit.solve(ridge=1e-9)
    other_w, other_b = rng.standard_normal((3, 6)), rng.standard_normal(3)
    assert reconstruction_error(x, y, w, b) <= reconstruction_error(x, y, other_w, other_b)


def test_ill_conditioned_solve_falls_back():
    fit = LeastSquaresFit(3, 1)
    fit.add(np.ones((10, 3)), np.ones((10, 1)))  # every column equals the bias column
    assert fit.solve(ridge=0.0) is None


def _run_chunks(model, feeds):
    return np.concatenate([run(model, {"x": feeds["x"][i:i + 2]})[0] for i in range(0, len(feeds["x"]), 2)])


def _calib(n=32, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def test_calibrated_planted_duplicate_stays_exact():
    model = conv_bn_relu_pool_conv(with_bn=True)
    import onnx

    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    b1 = onnx.numpy_helper.to_array(model.graph.initializer[1]).copy()
    w1[[6, 7]], b1[[6, 7]] = 0.1 * w1[[0, 1]], 0.1 * b1[[0, 1]]
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(b1, "b1"))
    # make channels 6, 7 exact multiples after BN too: same BN statistics scaled consistently
    names = {t.name: i for i, t in enumerate(model.graph.initializer)}
    arr = {n: onnx.numpy_helper.to_array(model.graph.initializer[i]).copy() for n, i in names.items()}
    for dst, src in ((6, 0), (7, 1)):
        arr["g"][dst], arr["var"][dst], arr["beta"][dst] = arr["g"][src], arr["var"][src] * 0.01, arr["beta"][src]
        arr["mu"][dst] = 0.1 * arr["mu"][src]
    for n in ("g", "var", "beta", "mu"):
        model.graph.initializer[names[n]].CopyFrom(onnx.numpy_helper.from_array(arr[n], n))
    feeds = _calib(2, 1)
    ref = run(model, feeds)[0]
    for calibration in (None, _calib()):
        small, rep = compress(model, CompressOptions(ratio=0.25, calibration=calibration))
        assert np.allclose(run(small, feeds)[0], ref, rtol=1e-3, atol=1e-4)


def test_calibration_improves_over_merge_on_calibration_data():
    model = conv_bn_relu_pool_conv(with_bn=True)
    calib = _calib(64)
    ref = _run_chunks(model, calib)
    merged = _run_chunks(compress(model, ratio=0.5)[0], calib)
    small, rep = compress(model, CompressOptions(ratio=0.5, calibration=calib))
    fitted = _run_chunks(small, calib)
    assert np.mean((fitted - ref) ** 2) < np.mean((merged - ref) ** 2)
    assert "refitted" in rep["layers"][0]["calibration"]


def two_residual_blocks(with_bn: bool):
    """stem conv -> relu -> 2 x (conv -> relu -> conv [-> BN] -> add stream -> relu)."""
    rng = np.random.default_rng(3)
    weights = rng_weights(rng, w0=(8, 3, 3, 3), a1=(8, 8, 3, 3), a2=(8, 8, 3, 3), c1=(8, 8, 3, 3), c2=(8, 8, 3, 3))
    weights.update({f"{k}b": (0.1 * rng.standard_normal(8)).astype(np.float32) for k in ("w0", "a1", "a2", "c1", "c2")})
    for k in ("a", "c"):
        weights.update({f"{k}g": rng.uniform(0.5, 1.5, 8).astype(np.float32), f"{k}be": rng.normal(0, 0.1, 8).astype(np.float32),
                        f"{k}mu": rng.normal(0, 0.1, 8).astype(np.float32), f"{k}v": rng.uniform(0.5, 2, 8).astype(np.float32)})
    body = ["s0 = Conv <pads = [1, 1, 1, 1]> (x, w0, w0b)", "h0 = Relu (s0)"]
    for k, src, dst in (("a", "h0", "h1"), ("c", "h1", "y")):
        body += [f"{k}t = Conv <pads = [1, 1, 1, 1]> ({src}, {k}1, {k}1b)", f"{k}r = Relu ({k}t)",
                 f"{k}o = Conv <pads = [1, 1, 1, 1]> ({k}r, {k}2, {k}2b)"]
        if with_bn:
            body.append(f"{k}n = BatchNormalization ({k}o, {k}g, {k}be, {k}mu, {k}v)")
        body += [f"{k}s = Add ({k}{'n' if with_bn else 'o'}, {src})", f"{dst} = Relu ({k}s)"]
    if not with_bn:
        weights = {k: v for k, v in weights.items() if not k.endswith(("g", "be", "mu", "v"))}
    inputs = ", ".join(f"float[{','.join(map(str, v.shape))}] {k}" for k, v in weights.items())
    text = header() + f"\nagraph (float[N, 3, 8, 8] x, {inputs}) => (float[N, 8, 8, 8] y) {{\n" + "\n".join(body) + "\n}"
    return build(text, weights)


@pytest.mark.parametrize("with_bn", [False, True])
def test_consumer_before_a_residual_add_also_cancels_the_stream_error(with_bn, monkeypatch):
    """The second block's consumer is fitted to the original sum, so it corrects what the first
    block's compression left in the residual stream: the output error on the calibration data
    drops below that of fitting the consumer to its own original output."""
    import onnx_merge.passes.calibrate_consumers as calibrate

    model = two_residual_blocks(with_bn)
    calib = _calib(64)
    ref = _run_chunks(model, calib)
    corrected = _run_chunks(compress(model, CompressOptions(ratio=0.5, calibration=calib))[0], calib)
    monkeypatch.setattr(calibrate, "residual_operand", lambda index, layer: None)
    plain = _run_chunks(compress(model, CompressOptions(ratio=0.5, calibration=calib))[0], calib)
    assert np.mean((corrected - ref) ** 2) < np.mean((plain - ref) ** 2)


@pytest.mark.parametrize("with_bn", [False, True])
def test_a_producer_whose_input_drifted_is_refitted_to_its_original_output(with_bn, monkeypatch):
    """The second block's first conv reads the stream that the first block's compression moved:
    it is refitted to its original output on the compressed model's input (the first block's,
    reading the untouched stem, is not), and the model's output error drops below that of
    leaving it as it was."""
    import onnx_merge.passes.calibrate_consumers as calibrate

    model = two_residual_blocks(with_bn)
    calib = _calib(64)
    ref = _run_chunks(model, calib)
    small, rep = compress(model, CompressOptions(ratio=0.5, calibration=calib))
    first, second = rep["layers"]
    assert "producers_refitted" not in first
    (done,) = second["producers_refitted"]
    assert done["error"]["after"] < done["error"]["before"]
    monkeypatch.setattr(calibrate, "drifted_producers", lambda index, unit, units: [])
    plain = _run_chunks(compress(model, CompressOptions(ratio=0.5, calibration=calib))[0], calib)
    assert np.mean((_run_chunks(small, calib) - ref) ** 2) < np.mean((plain - ref) ** 2)


@pytest.mark.parametrize("head", ["matmul-flatten", "transpose-flatten"])
def test_channel_last_flatten_is_refitted_in_its_layout(head):
    """There channel c owns features c, c + N, ...: the fit reads them in that order and writes the
    refitted consumer back in it, so a planted duplicate is still removed exactly, and on random
    weights the refit beats the data-free plan on the calibration data."""
    from tests.test_passes import CHANNEL_LAST_HEADS, make

    inputs, shapes, body = CHANNEL_LAST_HEADS[head]
    shape = [int(d) for d in inputs[6:inputs.index("]")].split(", ")]
    calib = {"x": np.random.default_rng(1).standard_normal([64] + shape[1:]).astype(np.float32)}
    ws = rng_weights(np.random.default_rng(0), **shapes)
    planted = {k: v.copy() for k, v in ws.items()}
    if head == "matmul-flatten":
        planted["w1"][:, 4], planted["b1"][4] = 0.05 * planted["w1"][:, 1], 0.05 * planted["b1"][1]
    else:
        planted["w1"][4], planted["b1"][4] = 0.05 * planted["w1"][1], 0.05 * planted["b1"][1]
    model = make(body + "\n y = Gemm <transB = 1> (f, w2, b2)", inputs.replace(f"[{shape[0]},", "[N,"),
                 "float[N, 4] y", planted)
    small, rep = compress(model, CompressOptions(ratio=1 / 6, calibration=calib))
    assert not rep["layers"][0]["calibration"].startswith("fell back") and rep["layers"][0]["kept"] == 5
    assert np.allclose(run(small, calib)[0], run(model, calib)[0], rtol=1e-3, atol=1e-3)

    model = make(body + "\n y = Gemm <transB = 1> (f, w2, b2)", inputs.replace(f"[{shape[0]},", "[N,"),
                 "float[N, 4] y", ws)
    ref = run(model, calib)[0]
    calibrated, rep = compress(model, CompressOptions(ratio=0.5, calibration=calib))
    assert "refitted" in rep["layers"][0]["calibration"]
    data_free = compress(model, CompressOptions(ratio=0.5))[0]
    assert np.mean((run(calibrated, calib)[0] - ref) ** 2) < np.mean((run(data_free, calib)[0] - ref) ** 2)


@pytest.mark.parametrize("spatial, consumer_pads", [(1, "pads = [1, 1]"), (3, "pads = [1, 1, 1, 1, 1, 1]"),
                                                    (2, 'auto_pad = "SAME_UPPER", strides = [2, 2]')],
                         ids=["conv1d", "conv3d", "auto-pad-same"])
def test_conv1d_conv3d_and_auto_pad_consumers_are_refitted(spatial, consumer_pads):
    from tests.test_passes import make

    k, pads = ", ".join(["3"] * spatial), ", ".join(["1"] * (2 * spatial))
    ws = rng_weights(np.random.default_rng(spatial), w1=(6, 2) + (3,) * spatial, b1=(6,), w2=(3, 6) + (3,) * spatial)
    body = f"""c = Conv <kernel_shape = [{k}], pads = [{pads}]> (x, w1, b1)
        r = Relu (c)
        y = Conv <kernel_shape = [{k}], {consumer_pads}> (r, w2)"""
    size = {1: [9], 2: [7, 6], 3: [4] * 3}[spatial]
    out = size if "strides" not in consumer_pads else [-(-n // 2) for n in size]
    model = make(body, f"float[N, 2, {', '.join(map(str, size))}] x", f"float[N, 3, {', '.join(map(str, out))}] y", ws)
    calib = {"x": np.random.default_rng(0).standard_normal([32, 2] + size).astype(np.float32)}
    ref = run(model, calib)[0]
    merged = run(compress(model, ratio=0.5)[0], calib)[0]
    small, rep = compress(model, CompressOptions(ratio=0.5, calibration=calib))
    assert "refitted" in rep["layers"][0]["calibration"]
    assert np.mean((run(small, calib)[0] - ref) ** 2) < np.mean((merged - ref) ** 2)


def test_conv_transpose_consumer_keeps_the_data_free_plan_with_a_note():
    from tests.test_passes import make

    ws = rng_weights(np.random.default_rng(0), w1=(6, 2, 3, 3), w2=(6, 3, 2, 2), b2=(3,))
    body = """c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
        r = Relu (c)
        y = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (r, w2, b2)"""
    model = make(body, "float[N, 2, 4, 4] x", "float[N, 3, 8, 8] y", ws)
    calib = {"x": np.random.default_rng(1).standard_normal((16, 2, 4, 4)).astype(np.float32)}
    small, rep = compress(model, CompressOptions(ratio=0.5, calibration=calib))
    data_free, _ = compress(model, ratio=0.5)
    assert rep["layers"][0]["calibration"].startswith("fell back to the data-free plan")
    assert np.allclose(run(small, calib)[0], run(data_free, calib)[0])


@pytest.mark.parametrize("head", ["matmul-flatten", "transpose-flatten"])
def test_data_free_plan_is_scored_in_the_fits_feature_order(head, monkeypatch):
    """The calibrated fit is kept only where it beats the data-free plan on the same statistics,
    so that plan must be scored with its columns in the fit's (channel-major) order: its score
    plus the targets' energy is the data-free model's squared error on the calibration data."""
    import onnx_merge.passes.calibrate_consumers as calibrate
    from tests.test_passes import CHANNEL_LAST_HEADS, make

    inputs, shapes, body = CHANNEL_LAST_HEADS[head]
    shape = [int(d) for d in inputs[6:inputs.index("]")].split(", ")]
    calib = {"x": np.random.default_rng(1).standard_normal([64] + shape[1:]).astype(np.float32)}
    model = make(body + "\n y = Gemm <transB = 1> (f, w2, b2)", inputs.replace(f"[{shape[0]},", "[N,"),
                 "float[N, 4] y", rng_weights(np.random.default_rng(0), **shapes))
    scored = []
    score = calibrate._data_free_objective
    monkeypatch.setattr(calibrate, "_data_free_objective", lambda *a: scored.append(score(*a)) or scored[-1])
    compress(model, CompressOptions(ratio=0.5, calibration=calib, calibration_mixup=0))  # the samples' rows only
    ref = run(model, calib)[0].astype(np.float64)
    data_free = run(compress(model, CompressOptions(ratio=0.5))[0], calib)[0]
    assert len(scored) == 1
    assert np.isclose(scored[0] + np.sum(ref ** 2), np.sum((data_free - ref) ** 2), rtol=1e-3)


def test_mixed_samples_are_convex_combinations_of_two_samples_the_same_every_pass():
    from onnx_merge.calibration import CalibrationSet

    rng = np.random.default_rng(3)
    feeds = {"a": rng.standard_normal((10, 3)).astype(np.float32), "b": rng.standard_normal((10, 2, 2))}
    calib = CalibrationSet(feeds, batch=4, mixed_copies=2)
    assert calib.mixed == 20
    real = list(calib.batches())
    assert all(np.array_equal(np.concatenate([p[k] for p in real]), v) for k, v in feeds.items())
    mixed = list(calib.mixed_batches())
    assert [len(p["a"]) for p in mixed] == [4, 4, 2] * 2
    for copy, (partner, lam) in enumerate(calib.pairs):
        for name, x in feeds.items():
            got = np.concatenate([p[name] for p in mixed[3 * copy:3 * copy + 3]])
            assert got.dtype == x.dtype
            lam_x = lam.reshape((-1,) + (1,) * (x.ndim - 1))
            # one weight per sample, shared by every input, each between two of the given samples
            assert np.allclose(got, lam_x * x + (1 - lam_x) * x[partner], atol=1e-6)
    assert all(0.0 <= v <= 1.0 for _, lam in calib.pairs for v in lam)
    again = list(calib.mixed_batches())
    assert all(np.array_equal(p["a"], q["a"]) for p, q in zip(mixed, again))


def test_integer_inputs_are_not_mixed():
    from onnx_merge.calibration import CalibrationSet

    feeds = {"ids": np.arange(12).reshape(6, 2), "x": np.ones((6, 3), np.float32)}
    calib = CalibrationSet(feeds, batch=4, mixed_copies=3)
    assert calib.mixed == 0 and list(calib.mixed_batches()) == []


def test_mixed_rows_go_to_a_fully_connected_consumer_not_to_a_convolution():
    """A Gemm gets one row per sample, too few for its fit: it is also fitted on the mixed
    samples. A convolution's patches give many rows per sample: it is fitted on the samples."""
    from tests.test_refine import mlp

    samples, copies = 40, CompressOptions().calibration_mixup
    dense = {"x": np.random.default_rng(8).standard_normal((samples, 16)).astype(np.float32)}
    _, rep = compress(mlp("gemm"), CompressOptions(ratio=0.5, calibration=dense, refine_iterations=0))
    assert copies >= 1 and rep["calibration"]["samples"] == samples and rep["calibration"]["mixed"] == copies * samples
    assert all(layer["calibration"].endswith(f"refitted on {(1 + copies) * samples} rows") for layer in rep["layers"])
    samples, positions, features = 48, 4 * 4, 8 * 3 * 3  # 768 patch rows: over 10 per feature
    _, rep = compress(conv_bn_relu_pool_conv(with_bn=True), CompressOptions(ratio=0.5, calibration=_calib(samples)))
    assert samples * positions >= 10 * features
    assert rep["layers"][0]["calibration"].endswith(f"refitted on {samples * positions} rows")


def test_mixed_samples_lower_the_error_on_inputs_the_fit_never_saw():
    """Calibrated on 48 samples of a 16-input MLP, the compressed model is closer to the original
    on 4,000 fresh inputs with mixed samples than without (mean over seeds)."""
    from tests.test_refine import mlp

    model = mlp("gemm")
    fresh = {"x": np.random.default_rng(99).standard_normal((4000, 16)).astype(np.float32)}
    ref = run(model, fresh)[0]
    errors = np.zeros(2)
    for seed in range(4):
        calib = {"x": np.random.default_rng(seed).standard_normal((48, 16)).astype(np.float32)}
        for k in (0, 1):
            small = compress(model, CompressOptions(ratio=0.5, calibration=calib, calibration_mixup=k))[0]
            errors[k] += np.mean((run(small, fresh)[0] - ref) ** 2)
    assert errors[1] < 0.95 * errors[0], errors


def test_statistics_accumulated_by_batches_match_the_row_matrix():
    """The rank-k updates of the upper triangle give the whole [X 1]^T [X 1], [X 1]^T Y and
    the targets' energy of all rows, whatever the batching."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((300, 7)), rng.standard_normal((300, 3))
    fit = LeastSquaresFit(7, 3)
    for part in (slice(0, 1), slice(1, 120), slice(120, 300)):
        fit.add(x[part].astype(np.float32), y[part])
    xa = np.hstack([x.astype(np.float32).astype(np.float64), np.ones((300, 1))])
    assert np.allclose(fit.gram, xa.T @ xa) and np.allclose(fit.cross, xa.T @ y)
    assert fit.rows == 300 and np.isclose(fit.energy, np.sum(y ** 2))
    w, b = rng.standard_normal((3, 7)), rng.standard_normal(3)
    from onnx_merge.math.calibrate import objective

    assert np.isclose(objective(fit, w, b) + fit.energy, np.sum((xa[:, :7] @ w.T + b - y) ** 2))


def test_im2col_gathers_only_the_rows_asked_for():
    from onnx_merge.math.calibrate import patch_count

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 9, 7))
    args = ([3, 2], [2, 1], [1, 0, 1, 1], [1, 2])
    full = im2col(x, *args)
    assert len(full) == 3 * patch_count(x.shape[2:], *args)
    rows = np.sort(rng.choice(len(full), 17, replace=False))
    assert np.array_equal(im2col(x, *args, rows=rows), full[rows])


def test_joint_selection_weighs_every_consumer():
    """Two consumers read the same channels: channel 0 matters only to the first, channel 1 only
    to the second. Chosen on both problems together, neither is dropped; each consumer alone
    would drop the other's channel."""
    from onnx_merge.math.calibrate import select_channels, select_channels_jointly

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 4))
    x[:, 3] = 0.01 * rng.standard_normal(500)  # a channel nobody needs
    fits = []
    for used in (0, 1):
        fit = LeastSquaresFit(4, 1)
        fit.add(x, 3 * x[:, [used]] + 0.2 * x[:, [2]])
        fits.append(fit)
    kept, refits = select_channels_jointly(fits, 4, 3)
    assert list(kept) == [0, 1, 2] and len(refits) == 2
    assert 1 not in select_channels(fits[0], 4, 2)[0] and 0 not in select_channels(fits[1], 4, 2)[0]
    for (w, b), used in zip(refits, (0, 1)):
        assert np.isclose(w[0, used], 3, atol=1e-2)


def test_original_targets_are_read_in_one_run_and_a_small_store_gives_the_same_model(monkeypatch):
    """The original model's rows for every chain come from one onnxruntime run; where the store
    holds one chain at a time, each chain reads its own, and the compressed model is the same."""
    import onnx_merge.passes.calibrate_consumers as calibrate

    model, calib = two_residual_blocks(with_bn=False), _calib(40)
    # 300 random patch rows of each batch's 1,024 or 512 (3 batches: a 72-feature consumer has 12 rows per feature)
    opts = dict(ratio=0.5, calibration=calib, calibration_batch=16, calibration_rows=300)
    monkeypatch.setattr(calibrate, "ROWS_PER_FEATURE", 12)
    small, rep = compress(model, CompressOptions(**opts))
    assert len(rep["layers"]) == 2 and rep["calibration"]["original_runs"] == 1
    for entry in rep["layers"]:  # per group: rows, errors of both plans, the plan kept, time
        assert entry["rows"] == 3 * 300 and entry["seconds"] >= 0
        assert entry["error"]["calibrated"] < entry["error"]["data_free"] and "refitted" in entry["calibration"]
    monkeypatch.setattr(calibrate, "STORE_BYTES", 1)
    again, rep = compress(model, CompressOptions(**opts))
    assert rep["calibration"]["original_runs"] == 3  # the second block's drifted producer reads its own
    assert np.allclose(run(again, calib)[0], run(small, calib)[0], atol=1e-6)
    monkeypatch.setattr(calibrate, "ROWS_PER_FEATURE", 20)  # 20 x 72 / 3 = 480 rows a batch, over the 300 asked
    assert all(e["rows"] == 3 * 480 for e in compress(model, CompressOptions(**opts))[1]["layers"])


def test_runs_start_from_cached_tensors_and_give_the_same_model(monkeypatch):
    """A group's run over the calibration set starts from the compressed model's tensors that an
    earlier run left and nothing since rewrote (the second block's from the first block's input,
    not from the model's): the model is the one that running every group from the inputs gives."""
    import onnx_merge.passes.calibrate_consumers as calibrate

    model, calib = two_residual_blocks(with_bn=True), _calib(40)
    opts = dict(ratio=0.5, calibration=calib, calibration_batch=16)
    small, rep = compress(model, CompressOptions(**opts))
    assert rep["calibration"]["runs_from_cached"] >= 2
    monkeypatch.setattr(calibrate, "CACHE_BYTES", 0)
    again, rep = compress(model, CompressOptions(**opts))
    assert rep["calibration"]["runs_from_cached"] == 0
    assert np.allclose(run(again, calib)[0], run(small, calib)[0], atol=1e-6)


def test_a_cached_tensor_goes_stale_when_a_weight_upstream_of_it_changes_not_downstream():
    from onnx_merge.calibration import ActivationCache
    from onnx_merge.graph import GraphIndex

    model, feeds = two_residual_blocks(with_bn=False), [_calib(8)]
    cache = ActivationCache(1 << 30)
    (out,) = cache.taps(model, ["h1"], "real", 1, keep=["h1"]).over(feeds)
    later = cache.taps(model, ["y"], "real", 1)
    assert list(later.cut) == ["h1"] and np.allclose(next(later.over(feeds))["y"], run(model, feeds[0])[0], atol=1e-5)
    index = GraphIndex(model)
    index.set_array("c2", index.array("c2") * 2)  # downstream of h1
    assert list(cache.taps(model, ["y"], "real", 1).cut) == ["h1"]
    index.set_array("a2", index.array("a2") * 2)  # upstream of h1
    assert not cache.taps(model, ["y"], "real", 1).cut


def _fresh_error(model, small, shape, n=48, seed=5):
    """Mean squared output error on inputs the calibration never saw."""
    xs = np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)
    return float(np.mean([(run(small, {"x": v[None]})[0] - run(model, {"x": v[None]})[0]) ** 2 for v in xs]))


@pytest.mark.parametrize("exclude", [["r", "ro"], []])
def test_depthwise_block_with_se_gate_refits_its_project_and_reduce_convs(exclude):
    """expand -> depthwise -> SE gate -> project: the group's kept channels are chosen on the
    project conv's problem, the SE reduce conv is refitted to the original's hidden layer (not
    asked which to keep) and the project conv is refitted on what the refitted gate gives. With
    the SE's hidden chain compressed too, the reduce conv is fitted to the outputs it still writes."""
    from tests.test_topologies import _inverted_residual_with_se

    model = _inverted_residual_with_se("HardSigmoid")
    calib = {"x": np.random.default_rng(1).standard_normal((64, 4, 6, 6)).astype(np.float32)}
    # the data-free plan at the same counts (its cap on the predicted error would keep more)
    plain, _ = compress(model, CompressOptions(ratio=0.5, exclude=exclude, max_group_error=1.0))
    small, rep = compress(model, CompressOptions(ratio=0.5, exclude=exclude, calibration=calib))
    entry = next(e for e in rep["layers"] if e.get("depthwise"))
    assert entry["method"] == "calibrated (depthwise group)", entry
    reduce_conv, project = (next(n.name for n in small.graph.node if n.input[1:2] == [w]) for w in ("r", "pj"))
    assert entry["refitted"] == [f"{reduce_conv} (gate)", project]
    assert entry["error"]["calibrated"] < entry["error"]["data_free"]
    dims = initializer_shapes(small)
    assert dims["ex"][0] == dims["dw"][0] == dims["r"][1] == dims["e"][0] == dims["pj"][1] == 6
    if not exclude:
        assert dims["r"][0] < 3 and any(e["layer"] == reduce_conv and "refitted" in e for e in rep["layers"])
    assert _fresh_error(model, small, (4, 6, 6)) < _fresh_error(model, plain, (4, 6, 6))


def test_fan_out_chooses_on_every_consumer_and_refits_each():
    """A squeeze conv read by two expand convs (SqueezeNet's fire module): the kept channels are
    chosen on both consumers' problems together and both are refitted."""
    from tests.test_topologies import _fire

    model = _fire()
    calib = {"x": np.random.default_rng(2).standard_normal((48, 8, 5, 5)).astype(np.float32)}
    plain, _ = compress(model, CompressOptions(ratio=0.5, exclude=["e1", "e3"]))
    small, rep = compress(model, CompressOptions(ratio=0.5, exclude=["e1", "e3"], calibration=calib))
    entry = next(e for e in rep["layers"] if e["layer"] == "Conv_0")
    assert entry["method"] == "calibrated" and len(entry["refitted"]) == 2 and len(entry["rows"]) == 2
    assert entry["error"]["calibrated"] < entry["error"]["data_free"]
    assert initializer_shapes(small)["e1"][1] == initializer_shapes(small)["e3"][1] == 3
    assert _fresh_error(model, small, (8, 5, 5)) < _fresh_error(model, plain, (8, 5, 5))


def test_gate_readers_are_the_reduce_convs_of_mul_gates_not_a_residual_blocks_first_conv():
    from onnx_merge.graph import GraphIndex
    from onnx_merge.groups import find_groups
    from onnx_merge.passes.calibrate_consumers import gate_readers
    from tests.test_topologies import _inverted_residual_with_se

    model = compress(_inverted_residual_with_se("Sigmoid"), CompressOptions(ratio=0.0))[0]  # nodes named
    index = GraphIndex(model)
    group = next(g for g in find_groups(index) if g.depthwise)
    assert gate_readers(index, group) == {next(n.name for n in model.graph.node if n.input[1:2] == ["r"])}
    index = GraphIndex(two_residual_blocks(with_bn=False))
    stream = next(g for g in find_groups(index) if g.residual)
    assert gate_readers(index, stream) == set()


def test_synthetic_calibration_refits_a_model_without_statistics_and_says_so(tmp_path, capsys):
    """--calibration synthetic: made-up images shaped as the model's input, no data; integer inputs refused."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from onnx_merge.api import synthetic_calibration
    from onnx_merge.cli import main
    from onnx_merge.errors import UsageError

    model = conv_bn_relu_pool_conv(with_bn=False)
    images = synthetic_calibration(model)["x"]
    assert images.shape == (256, 3, 8, 8) and images.dtype == np.float32
    np.testing.assert_allclose(images.std(axis=(0, 2, 3)), 1.0, rtol=1e-5)  # unit variance per channel
    small, report = compress(model, CompressOptions(ratio=0.5, calibration="synthetic"))
    layer = report["layers"][0]
    assert layer["method"] == "calibrated" and report["options"]["calibration_source"] == "synthetic"
    again, _ = compress(model, CompressOptions(ratio=0.5, calibration="synthetic"))
    assert [t.raw_data for t in again.graph.initializer] == [t.raw_data for t in small.graph.initializer]
    path, out, rep = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.5", "--calibration", "synthetic",
                 "--report", str(rep)]) == 0
    data = json.loads(rep.read_text())
    assert data["options"]["calibration"] == "synthetic" and data["verification"]["data"]["source"] == "random"
    assert data["summary"]["calibration_source"] == "synthetic"
    assert "refitted on synthetic" in capsys.readouterr().out
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.5"]) == 0  # data-free: the hint
    assert "--calibration synthetic refits them" in capsys.readouterr().err
    ids = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["y"])], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match="'ids' is tensor\\(int64\\)"):
        synthetic_calibration(ids)
    from onnx_merge.allocation import sensitivity
    from onnx_merge.sweep import fingerprint

    assert sensitivity(model, CompressOptions(calibration="synthetic"))["groups"][0]["measured_on"] == "synthetic"
    assert fingerprint("synthetic") == fingerprint("synthetic") != fingerprint("none")  # no file to read
    with pytest.raises(UsageError, match="calibration must be arrays, 'synthetic' or 'none'"):
        CompressOptions(calibration="noise").validate()


def test_a_budget_on_an_image_model_refits_on_synthetic_images_unless_told_none():
    """Without --calibration, a --target-macs budget on a model that takes images refits on
    synthetic images (it measures its costs on them anyway); --ratio and --calibration none keep the
    data-free plan, and so does a model whose input is no image."""
    from onnx_merge.allocation import sensitivity

    model = conv_bn_relu_pool_conv(with_bn=False)
    _, budget = compress(model, CompressOptions(target_macs=0.7))
    assert budget["options"]["calibration_source"] == "synthetic" and budget["options"]["calibrated"]
    assert budget["layers"][0]["method"] == "calibrated"
    _, told = compress(model, CompressOptions(target_macs=0.7, calibration="none"))
    _, ratio = compress(model, CompressOptions(ratio=0.5))
    for report in (told, ratio):
        assert report["options"]["calibration_source"] == "none" and not report["options"]["calibrated"]
        assert report["layers"][0]["method"] != "calibrated"
    assert sensitivity(model, CompressOptions())["calibration_source"] == "synthetic"
    from tests.test_budget import two_branches

    flat = two_branches()
    _, features = compress(flat, CompressOptions(target_params=0.7))
    assert features["options"]["calibration_source"] == "none"
