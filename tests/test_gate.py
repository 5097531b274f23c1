"""Gates that tell the truth, check data that means something, reports as an interface."""

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_merge import compress, report, verify_models
from onnx_merge.checkdata import CheckData, embedding_rows, resolve_input_shapes
from onnx_merge.cli import main
from onnx_merge.data import Preprocess, prepare_inputs
from onnx_merge.errors import ModelError
from onnx_merge.models.lenet import lenet_300_100, random_lenet_weights
from onnx_merge.runtime import graph_inputs
from onnx_merge.verify import Tolerance


@pytest.fixture
def lenet_file(tmp_path):
    path = tmp_path / "lenet.onnx"
    onnx.save(lenet_300_100(random_lenet_weights()), path)
    return path


def _exit_code(argv) -> int:
    """main's return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _nan_lenet(tmp_path):
    model = lenet_300_100(random_lenet_weights())
    last = [t for t in model.graph.initializer if len(t.dims) == 1][-1]  # the output layer's bias
    values = onnx.numpy_helper.to_array(last).copy()
    values[0] = np.nan
    last.CopyFrom(onnx.numpy_helper.from_array(values, last.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    return path


def test_a_failed_gate_exits_1_names_the_figure_and_writes_nothing(tmp_path, lenet_file, capsys):
    out = tmp_path / "small.onnx"
    assert main(["compress", str(lenet_file), "-o", str(out), "--method", "prune", "--min-cosine", "0.9999"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cosine similarity" in err[0] and "--min-cosine 0.9999" in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx"]
    assert main(["compress", str(lenet_file), "-o", str(out), "--method", "prune", "--max-top1-disagreement", "0",
                 "--keep-failed",
                 "--report", str(tmp_path / "r.json")]) == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert out.exists() and data["verification"]["ok"] is False and data["summary"]["written"] is True
    assert data["verification"]["gates"] == {"max-top1-disagreement": 0.0}
    assert "top-1 disagreement" in capsys.readouterr().err


def test_without_gates_a_moved_model_warns_and_exits_0(tmp_path, lenet_file, capsys):
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    assert main(["compress", str(lenet_file), "-o", str(out), "--ratio", "0.7", "--report", str(rep)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnx-merge: WARNING:") and "below 0.9" in err[0]
    data = json.loads(rep.read_text())
    assert data["verification"]["ok"] is True and data["verification"]["gates"] == {}
    assert data["verification"]["data"]["source"] == "random" and data["verification"]["data"]["samples"] == 16
    assert out.exists() and data["summary"]["verdict"] == "warning"
    assert main(["compress", str(lenet_file), "-o", str(out), "--ratio", "0"]) == 0
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize("gate", [[], ["--min-cosine", "-1"], ["--max-top1-disagreement", "1"],
                                  ["--atol", "1e9", "--rtol", "1e9"]])
def test_nan_never_passes(tmp_path, lenet_file, gate, capsys):
    bad = _nan_lenet(tmp_path)
    assert main(["verify", str(lenet_file), str(bad), *gate]) == 1
    assert "NaN or Inf" in capsys.readouterr().out
    result = verify_models(lenet_file, bad, tolerance=None)
    assert not result.ok and result.providers["cpu"]["logits"]["nonfinite"] == 16


@pytest.mark.parametrize("flags", [["--atol", "nan"], ["--rtol", "nan"], ["--min-cosine", "nan"],
                                   ["--max-top1-disagreement", "nan"], ["--min-cosine", "1.5"],
                                   ["--max-top1-disagreement", "-0.1"], ["--atol", "-1"], ["--rtol", "inf"]])
@pytest.mark.parametrize("command", ["verify", "compress"])
def test_bad_tolerances_are_usage_errors(tmp_path, lenet_file, flags, command, capsys):
    args = ["verify", str(lenet_file), str(lenet_file)] if command == "verify" else \
        ["compress", str(lenet_file), "-o", str(tmp_path / "o.onnx")]
    assert _exit_code(args + flags) == 2
    assert not (tmp_path / "o.onnx").exists()


def test_verify_keeps_atol_beside_min_cosine(tmp_path, lenet_file):
    out = tmp_path / "small.onnx"
    assert main(["compress", str(lenet_file), "-o", str(out), "--no-verify"]) == 0
    assert main(["verify", str(lenet_file), str(out), "--min-cosine", "0"]) == 0
    assert main(["verify", str(lenet_file), str(out), "--min-cosine", "0", "--atol", "1e-9"]) == 1
    assert main(["compress", str(lenet_file), "-o", str(out), "--no-verify", "--min-cosine", "0.5"]) == 2


def test_reports_of_every_command_follow_the_schema(tmp_path, lenet_file, capsys):
    out = tmp_path / "small.onnx"
    reports = {name: tmp_path / f"{name}.json" for name in ("compress", "verify", "eval", "bench")}
    assert main(["compress", str(lenet_file), "-o", str(out), "--report", str(reports["compress"])]) == 0
    assert main(["verify", str(lenet_file), str(out), "--min-cosine", "0", "--report", str(reports["verify"])]) == 0
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (20, 28, 28)).astype(np.uint8),
             y=np.arange(20) % 10)
    assert main(["eval", str(out), "--data", str(data), "--scale", "255", "--report", str(reports["eval"])]) == 0
    assert main(["bench", str(lenet_file), str(out), "--runs", "2", "--warmup", "0", "--no-memory",
                 "--report", str(reports["bench"])]) == 0
    capsys.readouterr()
    assert main(["inspect", str(lenet_file), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    written = {name: json.loads(path.read_text()) for name, path in reports.items()} | {"inspect": inspected}
    for name, data in written.items():
        report.validate(data)
        assert data["command"] == name and data["schema_version"] == report.SCHEMA_VERSION
        assert data["tool"]["onnx"] == onnx.__version__ and data["tool"]["onnxruntime"]
        assert set(data) == set(written["compress"])  # one top-level shape
    assert written["compress"]["options"]["min-cosine"] is None and written["compress"]["options"]["ratio"] == 0.5
    assert written["compress"]["summary"]["file_bytes_after"] < written["compress"]["summary"]["file_bytes_before"]
    assert written["eval"]["summary"]["samples"] == 20
    with pytest.raises(Exception, match="schema_version"):
        report.validate({k: v for k, v in written["compress"].items() if k != "schema_version"})


def test_a_report_repeats_its_run_with_config(tmp_path, lenet_file):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "a.onnx"), "--ratio", "0.3", "--method", "prune",
                 "--layer-ratio", "ip2=0.6", "--report", str(first)]) == 0
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "b.onnx"), "--config", str(first),
                 "--report", str(second)]) == 0
    a, b = (json.loads(p.read_text()) for p in (first, second))
    assert a["options"] == b["options"] and a["options"]["layer-ratio"] == ["ip2=0.6"]
    assert [r["kept"] for r in b["details"]["layers"]] == [210, 40]
    toml = tmp_path / "c.toml"
    toml.write_text('ratio = 0.2\nmethod = "prune"\n')
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "c.onnx"), "--config", str(toml),
                 "--ratio", "0.5", "--report", str(second)]) == 0  # the command line wins
    assert [r["kept"] for r in json.loads(second.read_text())["details"]["layers"]] == [150, 50]
    toml.write_text("no_such_option = 1\n")
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "d.onnx"), "--config", str(toml)]) == 2
    toml.write_text('method = "sideways"\n')
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "d.onnx"), "--config", str(toml)]) == 2


def test_third_party_prints_stay_off_stdout(lenet_file, monkeypatch, capsys):
    """Libraries that print their warnings (onnx-graphsurgeon did): inspect --json stays JSON."""
    from onnx_merge import api

    real = api.inspect_model

    def noisy(model):
        print("[W] Inference failed. You may want to try enabling partitioning")
        return real(model)

    monkeypatch.setattr(api, "inspect_model", noisy)
    assert main(["inspect", str(lenet_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["command"] == "inspect"


def test_a_constant_subgraph_that_cannot_fold_leaves_stdout_json_and_stderr_quiet(tmp_path, capfd):
    """A Reshape of 6 values to 4 in a constant subgraph: onnxruntime fails on it while folding
    and logs from C++ (file descriptor 2), as onnx-graphsurgeon printed to stdout when it folded."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", TensorProto.FLOAT, [6], np.ones(6))),
             helper.make_node("Constant", [], ["s"], value=helper.make_tensor("sv", TensorProto.INT64, [1], [4])),
             helper.make_node("Reshape", ["c", "s"], ["b"]), helper.make_node("Conv", ["x", "w", "b"], ["y"]),
             helper.make_node("Relu", ["y"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["z"])]
    weights = [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108)),
               helper.make_tensor("w2", TensorProto.FLOAT, [2, 4, 1, 1], rng.standard_normal(8))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 6, 6])], weights)
    path = tmp_path / "unfoldable.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    assert main(["inspect", str(path), "--json"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out)["summary"]["chains"] == 0 and "onnxruntime" not in captured.err


def _embedding_model() -> onnx.ModelProto:
    table = helper.make_tensor("emb", TensorProto.FLOAT, [100, 8], np.ones(800, np.float32))
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["emb", "ids64"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "seq"]),
                                             helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_check_data_draws_token_ids_over_the_embedding_and_shares_named_dims():
    model = _embedding_model()
    assert embedding_rows(model) == {"ids": 100}
    specs = graph_inputs(model)
    feeds, info = CheckData(samples=20, input_shapes=[("ids", [1, 12])]).feeds(model, specs)
    assert feeds["ids"].shape == (20, 12) and feeds["mask"].shape == (20, 12)  # 'seq' set once for both
    assert feeds["ids"].max() > 50 and feeds["ids"].min() >= 0 and feeds["ids"].max() < 100
    assert set(np.unique(feeds["mask"])) <= {0, 1} and info["integer_ranges"]["ids"] == [0, 99]
    shapes, guessed = resolve_input_shapes(specs, [])
    assert guessed == ["ids[1]", "mask[1]"] and shapes["ids"] == [1, 32]


def test_input_shape_sets_macs_and_is_checked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "conv.onnx"
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    rep = tmp_path / "r.json"
    assert main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--input-shape", "x=1x3x64x48",
                 "--report", str(rep)]) == 0
    data = json.loads(rep.read_text())
    assert data["summary"]["macs_before"] == 4 * 64 * 48 * 27
    assert data["verification"]["data"]["shapes"] == {"x": [16, 3, 64, 48]}
    assert "x 1x3x64x48" in capsys.readouterr().out
    for bad in ("x=1x3x64", "y=1x3x4x4", "x=1x5x4x4", "x=axb"):
        assert main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--input-shape", bad]) == 2


def test_uint8_without_scale_warns(caplog):
    x = np.full((4, 28, 28), 200, np.uint8)
    with caplog.at_level(logging.WARNING, logger="onnx_merge"):
        out = Preprocess()(x, 2, "images.npz")
    assert "uint8" in caplog.text and "--scale" in caplog.text and out.max() == 200
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnx_merge"):
        out = Preprocess(scale=255)(x, 2)
    assert not caplog.text and out.shape == (4, 784) and out.max() <= 1


def test_compress_preprocesses_its_data_and_checks_on_held_out_calibration(tmp_path, lenet_file):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=rng.integers(0, 256, (64, 28, 28, 1)).astype(np.uint8), labels=np.zeros(64))
    specs = graph_inputs(onnx.load(lenet_file))
    feeds = prepare_inputs(dict(np.load(calib)), specs, Preprocess(255, (0.5,), (0.5,), "nhwc"), "images")
    assert feeds["input"].shape == (64, 784) and -1 <= feeds["input"].min() and feeds["input"].max() <= 1
    rep = tmp_path / "r.json"
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "o.onnx"), "--calibration", str(calib),
                 "--input-key", "images", "--scale", "255", "--mean", "0.5", "--std", "0.5", "--layout", "nhwc",
                 "--refine-iterations", "0", "--calibration-mixup", "0", "--report", str(rep)]) == 0
    data = json.loads(rep.read_text())["verification"]["data"]
    assert data["source"].startswith("--calibration (last 8 of 64") and data["samples"] == 8
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "o.onnx"), "--calibration", str(calib)]) == 2


def test_api_takes_paths_and_protos_with_bounded_errors(lenet_file):
    small, rep = compress(lenet_file, ratio=0.5)
    assert rep["params_after"] < rep["params_before"]
    result = verify_models(onnx.load(lenet_file), small, tolerance=Tolerance(min_cosine=-1))
    assert result.ok and result.data["samples"] == 16
    broken = onnx.load(lenet_file)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError) as exc:
        verify_models(broken, broken)
    assert len(str(exc.value)) < 600


def test_python_m_and_version(tmp_path):
    run = subprocess.run([sys.executable, "-m", "onnx_merge", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and "compress" in run.stdout
    run = subprocess.run([sys.executable, "-m", "onnx_merge", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("onnx-merge ") and onnx.__version__ in run.stdout


@pytest.mark.slow
def test_akamaster_resnet20_acceptance(tmp_path, resnet20_weights, capsys):
    """Issue 19: at --ratio 0.5 the option-A ResNet-20 moves far; a 0.99 cosine gate refuses it."""
    from onnx_merge.models.resnet import resnet_akamaster

    src, out, rep = tmp_path / "r20.onnx", tmp_path / "small.onnx", tmp_path / "r.json"
    onnx.save(resnet_akamaster(resnet20_weights, fold=True), src)
    assert main(["compress", str(src), "-o", str(out), "--ratio", "0.5", "--min-cosine", "0.99"]) == 1
    assert not out.exists() and "--min-cosine 0.99" in capsys.readouterr().err
    assert main(["compress", str(src), "-o", str(out), "--ratio", "0.5", "--report", str(rep)]) == 0
    assert out.exists() and "onnx-merge: WARNING:" in capsys.readouterr().err
    report.validate(json.loads(rep.read_text()))


def test_api_raises_with_the_report_when_a_result_fails(tmp_path, lenet_file):
    from onnx_merge import compress_file
    from onnx_merge.errors import VerificationError
    from onnx_merge.options import CompressOptions

    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")
    with pytest.raises(VerificationError, match="not written") as exc:
        compress_file(lenet_file, out, CompressOptions(ratio=0.5), tolerance=Tolerance(min_cosine=0.9999))
    assert exc.value.report["written"] is False and out.read_bytes() == b"old"
    rep = compress_file(lenet_file, out, CompressOptions(ratio=0.5), tolerance=Tolerance(min_cosine=0.9999),
                        keep_failed=True)
    assert rep["written"] and not rep["verification"]["ok"] and out.read_bytes() != b"old"


def test_an_original_that_ignores_its_inputs_is_said_to_prove_nothing(tmp_path):
    # a zero-initialised head (torchvision ViT, MLP-Mixer with random weights): every candidate
    # that outputs zeros agrees perfectly, so the check must say it compared constants
    w = random_lenet_weights()
    live = lenet_300_100(w)
    w["ip3.weight"] = np.zeros_like(w["ip3.weight"])
    w["ip3.bias"] = np.zeros_like(w["ip3.bias"])
    dead = lenet_300_100(w)
    assert not any("says nothing" in m for m in verify_models(live, live).warnings)
    warnings = verify_models(dead, dead).warnings
    assert any("everywhere" in m and "says nothing" in m for m in warnings), warnings
