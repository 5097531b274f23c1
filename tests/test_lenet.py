"""The paper's LeNet-300-100: planted exact multiples, and the paper's FashionMNIST figures."""

import numpy as np
import onnx
import pytest

from onnx_merge import CompressOptions, compress
from onnx_merge.cli import main
from onnx_merge.data import Preprocess
from onnx_merge.evaluate import evaluate
from onnx_merge.models.lenet import lenet_300_100
from tests.conftest import FASHION
from tests.helpers import initializer_shapes, run

PAPER_MERGE = {0.5: 88.69, 0.6: 86.92, 0.7: 82.75, 0.8: 80.02}
PAPER_PRUNE = {0.5: 88.40, 0.6: 85.17, 0.7: 71.26, 0.8: 66.76}
BEST_PUBLISHED_DATA_FREE = {0.5: 88.83, 0.6: 87.75, 0.7: 83.92, 0.8: 80.02}  # the compensation issue's figures
DATA_FREE_TARGET = {0.5: 89.0, 0.6: 88.0, 0.7: 85.0, 0.8: 81.0}  # what that issue asks of the data-free default
PREPROCESS = Preprocess(scale=255, mean=(0.5,), std=(0.5,))


def plant_multiples(w: dict, layer: str, count: int, rng) -> dict:
    """Replace the ``count`` lowest-l1 neurons of ``layer`` by positive multiples of others,
    small enough that l1-norm removes exactly them."""
    w = {k: v.copy() for k, v in w.items()}
    rows = np.hstack([w[f"{layer}.weight"], w[f"{layer}.bias"][:, None]])
    l1 = np.abs(rows).sum(1)
    order = np.argsort(l1)
    planted, sources = order[:count], order[-count:]
    floor = l1[order[count]]
    for p, s in zip(planted, sources):
        scale = rng.uniform(0.2, 0.9) * floor / l1[s]
        w[f"{layer}.weight"][p] = scale * w[f"{layer}.weight"][s]
        w[f"{layer}.bias"][p] = scale * w[f"{layer}.bias"][s]
    return w


def test_planted_multiples_merge_exactly_and_prune_does_not(tmp_path, lenet_weights):
    rng = np.random.default_rng(0)
    w = plant_multiples(plant_multiples(lenet_weights, "ip1", 60, rng), "ip2", 30, rng)
    src = tmp_path / "planted.onnx"
    onnx.save(lenet_300_100(w), src)
    x = rng.standard_normal((64, 784)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", input=x)
    common = ["--ratio", "0", "--layer-ratio", "ip1=0.2", "--layer-ratio", "ip2=0.3", "--inputs",
              str(tmp_path / "inputs.npz")]
    merged, pruned = tmp_path / "merged.onnx", tmp_path / "pruned.onnx"
    assert main(["compress", str(src), "-o", str(merged), *common]) == 0
    assert main(["compress", str(src), "-o", str(pruned), "--method", "prune", *common]) == 0
    ref = run(onnx.load(src), {"input": x})[0]
    got = run(onnx.load(merged), {"input": x})[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4
    dims = initializer_shapes(onnx.load(merged))
    assert dims["ip1.weight"] == (240, 784) and dims["ip2.weight"] == (70, 240) and dims["ip3.weight"] == (10, 70)
    got_pruned = run(onnx.load(pruned), {"input": x})[0]
    assert np.abs(got_pruned - ref).max() / np.abs(ref).max() > 1e-2
    # verify as a gate agrees
    assert main(["verify", str(src), str(merged), "--inputs", str(tmp_path / "inputs.npz"), "--rtol", "1e-4",
                 "--atol", "1e-4"]) == 0


def _accuracy(model, data) -> float:
    return 100 * evaluate(model.SerializeToString(), data["x"], data["y"], PREPROCESS, progress=False)["top1"]


def test_builder_reproduces_checkpoint_accuracy(lenet_weights, fashion_test):
    assert _accuracy(lenet_300_100(lenet_weights), fashion_test) == pytest.approx(89.80, abs=0.005)


@pytest.mark.parametrize("ratio", sorted(PAPER_MERGE))
def test_paper_configuration_reproduces_paper_and_defaults_beat_it(ratio, lenet_weights, fashion_test):
    model = lenet_300_100(lenet_weights)
    paper_merge = compress(model, ratio=ratio, method="merge", criterion="l1-norm", scale_rule="exact",
                           threshold=0.45, independent_layers=True)[0]
    paper_prune = compress(model, ratio=ratio, method="prune")[0]
    assert _accuracy(paper_merge, fashion_test) == pytest.approx(PAPER_MERGE[ratio], abs=0.011)
    assert _accuracy(paper_prune, fashion_test) == pytest.approx(PAPER_PRUNE[ratio], abs=0.011)
    merge = _accuracy(compress(model, CompressOptions(ratio=ratio, method="merge"))[0], fashion_test)
    default = _accuracy(compress(model, CompressOptions(ratio=ratio))[0], fashion_test)
    assert merge > PAPER_MERGE[ratio]
    assert default > BEST_PUBLISHED_DATA_FREE[ratio] and default >= DATA_FREE_TARGET[ratio]


CALIBRATED_TARGET = {0.5: 89.2, 0.6: 88.8, 0.7: 87.5, 0.8: 83.0}  # the compensation issue, 512 training images


@pytest.mark.slow
@pytest.mark.parametrize("ratio", sorted(CALIBRATED_TARGET))
def test_calibrated_default_meets_the_issue_targets(ratio, lenet_weights, fashion_test):
    """Calibrated on the first 512 FashionMNIST *training* images (never the test set)."""
    from onnx_merge.data import load_idx_dir

    train = load_idx_dir(FASHION, "train")
    calib = {"input": PREPROCESS(train["x"][:512], 2)}
    small = compress(lenet_300_100(lenet_weights), CompressOptions(ratio=ratio, calibration=calib))[0]
    assert _accuracy(small, fashion_test) >= CALIBRATED_TARGET[ratio]
