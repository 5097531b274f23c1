"""Loading and saving: external data kept, traversal refused, atomic writes."""

import os

import numpy as np
import onnx
import pytest

from onnx_merge.cli import main
from onnx_merge.errors import ModelError
from onnx_merge.io import external_files, load_model
from onnx_merge.models.lenet import lenet_300_100, random_lenet_weights


def test_external_data_layout_is_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(lenet_300_100(random_lenet_weights()), src / "m.onnx", save_as_external_data=True,
              location="m.weights", size_threshold=0)
    out = tmp_path / "small.onnx"
    assert main(["compress", str(src / "m.onnx"), "-o", str(out)]) == 0
    assert (tmp_path / "small.onnx.data").is_file()
    assert out.stat().st_size < 10_000  # the weights live in the data file
    assert sorted(os.listdir(tmp_path)) == ["small.onnx", "small.onnx.data", "src"]
    loaded = load_model(out)
    assert loaded.external


def test_rerun_into_an_external_data_output_from_its_folder(tmp_path, monkeypatch):
    """A second run over the same output, started in the output's folder, replaces both files."""
    onnx.save(lenet_300_100(random_lenet_weights()), tmp_path / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    for ratio in ("0.5", "0.7", "0.6"):
        assert main(["compress", "m.onnx", "-o", "small.onnx", "--ratio", ratio]) == 0
        # the new data goes under a fresh name (the old model kept reading its own until replaced);
        # the replaced model's data file is then removed, and nothing else
        (data,) = set(os.listdir(tmp_path)) - {"m.onnx", "m.onnx.data", "small.onnx"}
        assert external_files("small.onnx") == [tmp_path.resolve() / data]
    weights = {t.name: tuple(t.dims) for t in onnx.load("small.onnx").graph.initializer}
    assert weights["ip1.weight"] == (120, 784)  # the last run's ratio, data read back from the new file


def test_external_data_outside_folder_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    model = lenet_300_100(random_lenet_weights())
    onnx.save(model, tmp_path / "x.onnx", save_as_external_data=True, location="secret.bin", size_threshold=0)
    m = onnx.load(tmp_path / "x.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    onnx.save(m, inner / "evil.onnx")
    with pytest.raises(ModelError, match="outside"):
        load_model(inner / "evil.onnx")
    os.remove(tmp_path / "secret.bin")
    with pytest.raises(ModelError, match="missing"):
        load_model(tmp_path / "x.onnx")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(lenet_300_100(random_lenet_weights()), src)
    before = src.read_bytes()

    def broken(*a, **k):
        raise onnx.checker.ValidationError("boom")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    assert main(["compress", str(src), "-o", str(tmp_path / "o.onnx")]) == 3
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert src.read_bytes() == before


def test_a_model_file_is_parsed_once_and_a_rewritten_one_again(tmp_path, monkeypatch):
    """external_files hands its parse to load_model; a file saved anew is read anew."""
    import onnx_merge.io as io

    path = tmp_path / "m.onnx"
    onnx.save(lenet_300_100(random_lenet_weights()), path)
    parses = []
    real = onnx.load
    monkeypatch.setattr(io.onnx, "load", lambda *a, **k: parses.append(a[0]) or real(*a, **k))
    assert external_files(path) == [] and external_files(path) == []
    load_model(path)
    assert len(parses) == 1
    onnx.save(lenet_300_100(random_lenet_weights()), path, save_as_external_data=True, location="m.data")
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert [p.name for p in external_files(path)] == ["m.data"] and len(parses) == 2


def test_finite_is_told_from_a_float64_sum_without_mistaking_overflow():
    from onnx_merge.io import _all_finite

    big = np.full(10, 3e38, np.float32)  # finite, though their float32 sum is not
    assert _all_finite(big) and _all_finite(np.full(10, 1e308))
    assert not _all_finite(np.append(big, np.nan)) and not _all_finite(np.array([np.inf, -np.inf], np.float16))


@pytest.mark.parametrize("external", [False, True])
def test_nan_in_a_layer_weight_is_refused_before_any_work(tmp_path, external, capsys):
    """Read where the bytes lie (the model file or its data file), not from a copy."""
    from onnx import numpy_helper

    model = lenet_300_100(random_lenet_weights())
    first = model.graph.initializer[0]
    w = numpy_helper.to_array(first).copy()
    w[1, 7] = np.nan
    first.CopyFrom(numpy_helper.from_array(w, first.name))
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=external, location="m.data")
    assert main(["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.3"]) == 3  # a bad model
    err = capsys.readouterr().err
    assert f"tensor {first.name!r}" in err and "holds NaN or Inf values" in err
    assert not (tmp_path / "out.onnx").exists()
