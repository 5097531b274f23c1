"""Sessions on a file's weights where they lie: the structure mapped_model writes, read by onnx
and by onnxruntime, against the file itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_merge.errors import ModelError
from onnx_merge.models.lenet import lenet_300_100, random_lenet_weights
from onnx_merge.runtime import make_session
from onnx_merge.wire import mapped_model


@pytest.fixture
def lenet(tmp_path):
    path = tmp_path / "lenet.onnx"
    onnx.save(lenet_300_100(random_lenet_weights()), path)
    return path


def test_large_weights_point_at_their_own_bytes_in_the_file(lenet):
    structure = mapped_model(lenet, min_bytes=4096)
    assert structure is not None and len(structure) < lenet.stat().st_size // 50
    model, original = onnx.load_from_string(structure), onnx.load(lenet)
    raw = lenet.read_bytes()
    by_name = {t.name: t for t in original.graph.initializer}
    moved = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert moved and len(moved) < len(original.graph.initializer)  # biases under 4 KiB stay inline
    for tensor in model.graph.initializer:
        want = by_name[tensor.name]
        assert list(tensor.dims) == list(want.dims) and tensor.data_type == want.data_type
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            start, length = int(info["offset"]), int(info["length"])
            assert info["location"] == lenet.name and raw[start:start + length] == want.raw_data
        else:
            assert tensor.raw_data == want.raw_data


def test_a_session_on_the_mapped_file_computes_what_the_file_does(lenet):
    from onnx_merge.runtime import _mapped_session, _options

    x = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
    mapped = _mapped_session(lenet, _options(False, None, False), "cpu")  # None if onnxruntime refused it
    loaded = make_session(lenet, in_place=False)
    name = loaded.get_inputs()[0].name
    np.testing.assert_array_equal(mapped.run(None, {name: x})[0], loaded.run(None, {name: x})[0])


def test_an_ir_version_newer_than_onnxruntime_reads_is_stamped_down(tmp_path, lenet):
    model = onnx.load(lenet)
    model.ir_version = 99
    newer = tmp_path / "newer.onnx"
    onnx.save(model, newer)
    assert onnx.load_from_string(mapped_model(newer, ir_version=10)).ir_version == 10
    import onnxruntime as ort

    with pytest.raises(Exception, match="IR version"):
        ort.InferenceSession(str(newer), providers=["CPUExecutionProvider"])  # from the file itself: refused
    make_session(newer)


def test_nothing_to_map_or_not_a_model(tmp_path, lenet):
    external = tmp_path / "ext.onnx"
    onnx.save(onnx.load(lenet), external, save_as_external_data=True, location="ext.data", size_threshold=0)
    assert mapped_model(external) is None  # its weights already live in a file onnxruntime maps
    make_session(external)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(lenet.read_bytes()[:5000])
    assert mapped_model(truncated) is None
    with pytest.raises(ModelError, match="cut.onnx"):
        make_session(truncated)
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert mapped_model(tmp_path / "empty.onnx") is None
