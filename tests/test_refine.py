"""Block refinement of fully connected chains: the gradient, the held-out gate, the graph rewrite."""

import numpy as np
import pytest
from scipy.optimize import check_grad

from onnx_merge import CompressOptions, compress
from onnx_merge.math.refine import DenseBlock, block_error, loss_and_gradient, refine_block
from tests.helpers import build, header, run


def random_block(rng, features=6, hidden=5, outputs=3, slope=0.0) -> DenseBlock:
    return DenseBlock(rng.standard_normal((hidden, features)), rng.standard_normal(hidden),
                      rng.standard_normal((outputs, hidden)), rng.standard_normal(outputs), slope)


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_gradient_matches_finite_differences(slope):
    rng = np.random.default_rng(1)
    start = random_block(rng, slope=slope)
    x, target = rng.standard_normal((40, 6)), rng.standard_normal((40, 3))
    theta0 = start.flat()
    theta = theta0 + 0.3 * rng.standard_normal(theta0.size)
    args = (start, x, target, 0.5, theta0)
    err = check_grad(lambda t: loss_and_gradient(t, *args)[0], lambda t: loss_and_gradient(t, *args)[1], theta)
    assert err < 1e-5 * max(1.0, np.linalg.norm(loss_and_gradient(theta, *args)[1]))


@pytest.mark.parametrize("name", ["gelu", "silu", "hard_swish"])
def test_gradient_through_any_named_activation_matches_finite_differences(name):
    """GELU/SiLU/HardSwish blocks (a transformer's FFN) are refined too: the derivative by
    central differences gives the objective's gradient."""
    from onnx_merge.math.activations import activation

    rng = np.random.default_rng(2)
    start = random_block(rng)
    start = DenseBlock(start.w1, start.b1, start.w2, start.b2, fn=activation(name))
    x, target = rng.standard_normal((40, 6)), rng.standard_normal((40, 3))
    theta0 = start.flat()
    theta = theta0 + 0.3 * rng.standard_normal(theta0.size)
    args = (start, x, target, 0.5, theta0)
    err = check_grad(lambda t: loss_and_gradient(t, *args)[0], lambda t: loss_and_gradient(t, *args)[1], theta)
    assert err < 1e-4 * max(1.0, np.linalg.norm(loss_and_gradient(theta, *args)[1]))


def test_refinement_lowers_the_error_of_a_smaller_block():
    """A block with fewer hidden units than the one that made the targets gets closer to them,
    on all rows and on the held-out ones."""
    rng = np.random.default_rng(2)
    teacher = random_block(rng, hidden=12)
    x = rng.standard_normal((400, 6))
    student = DenseBlock(teacher.w1[:4], teacher.b1[:4], teacher.w2[:, :4], teacher.b2)
    refined, info = refine_block(student, x, teacher(x), iterations=50)
    assert block_error(refined, x, teacher(x)) < block_error(student, x, teacher(x))
    before, after = info["held_out_error"]
    assert after < before


def test_an_exact_block_is_left_alone():
    rng = np.random.default_rng(3)
    block = random_block(rng)
    x = rng.standard_normal((300, 6))
    assert refine_block(block, x, block(x), iterations=20) is None


def mlp(layout: str):
    """x (N, 16) -> 32 -> ReLU -> 24 -> ReLU -> 10, as Gemm (transB 1 or 0) or MatMul + Add."""
    rng = np.random.default_rng(4)
    sizes = [(16, 32), (32, 24), (24, 10)]
    weights, body, src = {}, [], "x"
    for i, (f, m) in enumerate(sizes):
        w = (rng.standard_normal((f, m)) / np.sqrt(f)).astype(np.float32)
        weights[f"b{i}"] = (0.1 * rng.standard_normal(m)).astype(np.float32)
        out = "y" if i == len(sizes) - 1 else f"z{i}"
        if layout == "gemm-transB":
            weights[f"w{i}"] = np.ascontiguousarray(w.T)
            body.append(f"{out} = Gemm <transB = 1> ({src}, w{i}, b{i})")
        elif layout == "gemm":
            weights[f"w{i}"] = w
            body.append(f"{out} = Gemm ({src}, w{i}, b{i})")
        else:
            weights[f"w{i}"] = w
            body += [f"m{i} = MatMul ({src}, w{i})", f"{out} = Add (m{i}, b{i})"]
        if out != "y":
            body.append(f"h{i} = Relu ({out})")
            src = f"h{i}"
    inputs = ", ".join(f"float[{','.join(map(str, v.shape))}] {k}" for k, v in weights.items())
    text = header() + f"\nagraph (float[N, 16] x, {inputs}) => (float[N, 10] y) {{\n" + "\n".join(body) + "\n}"
    return build(text, weights)


@pytest.mark.parametrize("layout", ["gemm-transB", "gemm", "matmul"])
def test_refined_chains_reproduce_the_original_better_on_the_calibration_data(layout):
    model = mlp(layout)
    calib = {"x": np.random.default_rng(5).standard_normal((512, 16)).astype(np.float32)}
    ref = run(model, calib)[0]
    errors, reports = {}, {}
    for iterations in (0, 50):
        small, reports[iterations] = compress(model, CompressOptions(ratio=0.5, calibration=calib,
                                                                     refine_iterations=iterations))
        errors[iterations] = float(np.mean((run(small, calib)[0] - ref) ** 2))
    notes = [layer.get("refinement", "") for layer in reports[50]["layers"]]
    assert any(n.startswith("producer and consumer refined together") for n in notes), notes
    assert [layer["method"].endswith(" + refined") for layer in reports[50]["layers"]] == [
        n.startswith("producer and consumer refined together") for n in notes]
    assert all("refinement" not in layer for layer in reports[0]["layers"])
    assert errors[50] < errors[0]


def test_too_few_calibration_rows_are_named():
    model = mlp("gemm")
    calib = {"x": np.random.default_rng(6).standard_normal((100, 16)).astype(np.float32)}
    _, report = compress(model, CompressOptions(ratio=0.5, calibration=calib, calibration_mixup=0))
    notes = [layer["refinement"] for layer in report["layers"]]
    assert notes and all(n == "not refined: 100 calibration rows (refinement needs 256)" for n in notes), notes


def test_a_block_over_the_budget_is_named_and_holds_no_rows(monkeypatch):
    import onnx_merge.passes.calibrate_consumers as calibrate

    monkeypatch.setattr(calibrate, "MAX_REFINE_WORK", 1000)
    calib = {"x": np.random.default_rng(7).standard_normal((300, 16)).astype(np.float32)}
    _, report = compress(mlp("matmul"), CompressOptions(ratio=0.5, calibration=calib))
    notes = [layer["refinement"] for layer in report["layers"]]
    assert notes and all(n.endswith("parameters are too many for the refinement budget") for n in notes), notes
