"""Real model layouts shipped with the onnx package (weights made by constant subgraphs,
IR version 3): every one compresses into a valid, smaller model that runs."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_merge.cli import main

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
FAST = ["light_squeezenet", "light_shufflenet", "light_inception_v1", "light_inception_v2", "light_densenet121"]
SLOW = ["light_bvlc_alexnet", "light_zfnet512", "light_vgg19", "light_resnet50"]


def _compress(tmp_path, name):
    src = LIGHT / f"{name}.onnx"
    if not src.is_file():
        pytest.skip(f"{src} is not shipped with this onnx version")
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    assert main(["compress", str(src), "-o", str(out), "--ratio", "0.3", "--coupled", "prune", "--report",
                 str(report)]) == 0
    import json

    data = json.loads(report.read_text())
    assert data["summary"]["params_after"] < data["summary"]["params_before"]
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    outputs = session.run(None, {inp.name: np.zeros(shape, np.float32)})
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(
        None, {inp.name: np.zeros(shape, np.float32)})
    assert [o.shape for o in outputs] == [r.shape for r in reference]


@pytest.mark.parametrize("name", FAST)
def test_light_model_compresses(tmp_path, name):
    _compress(tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_large_light_model_compresses(tmp_path, name):
    _compress(tmp_path, name)
