"""The command line contract: exit codes, one-line errors, nothing half-written."""

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_merge import report
from onnx_merge.cli import main
from onnx_merge.models.lenet import lenet_300_100, random_lenet_weights


@pytest.fixture
def lenet_file(tmp_path):
    path = tmp_path / "lenet.onnx"
    onnx.save(lenet_300_100(random_lenet_weights()), path)
    return path


def test_compress_verify_inspect_roundtrip(tmp_path, lenet_file, capsys):
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    assert main(["compress", str(lenet_file), "-o", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["summary"]["params_after"] < data["summary"]["params_before"]
    figures = data["verification"]["providers"]["cpu"]["logits"]
    assert -1 <= figures["cosine"] <= 1 and 0 <= figures["top1_agreement"] <= 1 and figures["max_abs"] > 0
    assert [r["kept"] for r in data["details"]["layers"]] == [150, 50]
    assert main(["verify", str(lenet_file), str(lenet_file)]) == 0
    assert main(["verify", str(lenet_file), str(out)]) == 1
    err = capsys.readouterr().out
    assert "output 'logits'" in err and "FAILED" in err
    assert main(["verify", str(lenet_file), str(out), "--min-cosine", "0.0"]) == 0
    assert main(["inspect", str(lenet_file)]) == 0
    assert "ip1" in capsys.readouterr().out


def test_ratio_zero_reproduces_outputs(tmp_path, lenet_file):
    out = tmp_path / "same.onnx"
    assert main(["compress", str(lenet_file), "-o", str(out), "--ratio", "0", "--no-verify"]) == 0
    assert main(["verify", str(lenet_file), str(out), "--atol", "1e-5", "--rtol", "0"]) == 0


def test_written_ir_version_loads_in_onnxruntime(tmp_path, lenet_file):
    model = onnx.load(lenet_file)
    model.ir_version = onnx.IR_VERSION  # newer than onnxruntime may accept
    onnx.save(model, lenet_file)
    out = tmp_path / "o.onnx"
    assert main(["compress", str(lenet_file), "-o", str(out)]) == 0
    from onnx_merge.io import max_runtime_ir_version

    assert onnx.load(out).ir_version <= max_runtime_ir_version()


def _bad_files(tmp_path, lenet_file):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    rand = tmp_path / "random.onnx"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(lenet_file.read_bytes()[:5000])
    tensor = tmp_path / "tensor.onnx"
    tensor.write_bytes(onnx.numpy_helper.from_array(np.ones(3, np.float32)).SerializeToString())
    return {"missing": tmp_path / "nope.onnx", "empty": empty, "random": rand, "truncated": trunc, "tensor": tensor}


@pytest.mark.parametrize("kind", ["missing", "empty", "random", "truncated", "tensor"])
def test_bad_models_exit_3_with_one_line_and_no_output(tmp_path, lenet_file, kind, capsys):
    bad = _bad_files(tmp_path, lenet_file)[kind]
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out.onnx"
    assert main(["compress", str(bad), "-o", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnx-merge: error:") and "Traceback" not in err[0]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == before
    assert main(["inspect", str(bad)]) == 3
    assert main(["verify", str(bad), str(lenet_file)]) == 3


@pytest.mark.parametrize("option", ["--calibration", "--inputs"])
@pytest.mark.parametrize("arrays, what", [({"x": np.zeros((8, 785), np.float32)}, "has shape [8, 785]"),
                                          ({"x": np.zeros((8, 28, 27), np.float32)}, "has shape [8, 28, 27]")])
def test_data_of_the_wrong_shape_is_named_and_exits_3(tmp_path, lenet_file, option, arrays, what, capsys):
    data, out = tmp_path / "d.npz", tmp_path / "out.onnx"
    np.savez(data, **arrays)
    assert main(["compress", str(lenet_file), "-o", str(out), option, str(data)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and "the model takes [?, 784]" in err[0] and not out.exists()


def test_usage_errors_exit_2(tmp_path, lenet_file, capsys):
    assert main(["compress", str(lenet_file), "-o", str(lenet_file)]) == 2  # never overwrite the input
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "o.onnx"), "--ratio", "1.5"]) == 2
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "nodir" / "o.onnx")]) == 2
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "o.onnx"), "--calibration-mixup", "-1"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(lenet_file)])
    assert exc.value.code == 2
    assert not (tmp_path / "o.onnx").exists()


def test_cuda_refused_clearly_without_it(tmp_path, lenet_file, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the refusal path cannot be exercised")
    assert main(["verify", str(lenet_file), str(lenet_file), "--providers", "cpu,cuda"]) == 2
    assert "CUDA execution provider requested" in capsys.readouterr().err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = capsys.readouterr().out
    for flag in ("--ratio", "--method", "--criterion", "--layer-ratio", "--exclude", "--no-verify", "--providers"):
        assert flag in text


def test_bench_compares_models(tmp_path, lenet_file, capsys):
    out = tmp_path / "small.onnx"
    assert main(["compress", str(lenet_file), "-o", str(out), "--no-verify"]) == 0
    report = tmp_path / "bench.json"
    plot = tmp_path / "latency.png"
    assert main(["bench", str(lenet_file), str(out), "--runs", "5", "--warmup", "1", "--batch", "1,4",
                 "--threads", "1", "--report", str(report), "--plot", str(plot)]) == 0
    rows = json.loads(report.read_text())["details"]["results"]
    assert [(r["model"], r["batch"]) for r in rows] == [(str(lenet_file), 1), (str(out), 1), (str(lenet_file), 4),
                                                        (str(out), 4)]
    assert rows[0]["p50_ratio"] == 1.0 and rows[1]["params"] < rows[0]["params"]
    assert rows[2]["macs"] == 4 * rows[0]["macs"] and 0 < rows[1]["macs_ratio"] < 1
    assert all(r["p50_ms"] <= r["p99_ms"] and len(r["samples_ms"]) == 5 for r in rows)
    assert main(["bench", str(lenet_file), str(out), "--runs", "60", "--warmup", "1", "--block", "5", "--threads", "1",
                 "--no-memory"]) == 0  # 12 turns: the ratio comes with its interval
    assert re.search(r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\)", capsys.readouterr().out)
    assert all(r["peak_memory_mib"] > 0 and r["session_create_s"] > 0 for r in rows)
    assert plot.stat().st_size > 0
    assert main(["bench", str(lenet_file), "--runs", "0"]) == 2
    assert main(["bench", str(lenet_file), "--block", "0"]) == 2
    assert main(["bench", str(lenet_file), "--batch", "0"]) == 2
    assert main(["bench", str(lenet_file), "--threads", "two"]) == 2


def test_compress_bench_times_the_result_against_the_original(tmp_path, lenet_file, capsys):
    out, report_path = tmp_path / "small.onnx", tmp_path / "r.json"
    args = ["compress", str(lenet_file), "-o", str(out), "--no-verify", "--bench", "--bench-runs", "5",
            "--bench-batch", "1,2", "--bench-threads", "1", "--report", str(report_path)]
    assert main(args) == 0
    assert "p50 vs original" in capsys.readouterr().out
    written = json.loads(report_path.read_text())
    report.validate(written)
    rows = written["details"]["latency"]["rows"]
    assert [(r["model"], r["batch"], r["threads"]) for r in rows] == [
        (str(lenet_file), 1, 1), (str(out), 1, 1), (str(lenet_file), 2, 1), (str(out), 2, 1)]
    assert rows[0]["p50_ratio"] == 1.0 and 0 < rows[1]["macs_ratio"] < 1
    assert rows[0]["p50_ratio_interval"] is None and rows[1]["p50_ratio_interval"] is None  # one turn: no interval
    assert main(args[:-2] + ["--bench-runs", "0"]) == 2


def test_latency_warnings_name_a_slow_result():
    from onnx_merge.bench import latency_warnings

    def row(model, p50_ratio, macs_ratio):
        return {"model": model, "batch": 1, "threads": 1, "p50_ratio": p50_ratio, "macs_ratio": macs_ratio}

    base = row("a", 1.0, 1.0)
    assert latency_warnings([base, row("b", 0.55, 0.5)]) == []  # within 15 % of its MACs
    assert "lags the MACs" in latency_warnings([base, row("b", 0.6, 0.5)])[0]
    assert "not faster" in latency_warnings([base, row("b", 1.02, 0.5)])[0]
    assert latency_warnings([base, row("b", 0.9, None)]) == []  # no MAC count: only the 1.0 line holds


def test_ratio_interval_follows_the_turns_and_their_noise():
    from onnx_merge.bench import ratio_interval, turn_ratios
    from onnx_merge.terminal import ratio_text

    rng = np.random.default_rng(0)
    # 20 turns of 10 runs; the machine drifts 2x over the run, both models alike, around a ratio of 0.8
    drift = np.repeat(np.linspace(1.0, 2.0, 20), 10)
    reference = drift * (1 + 0.02 * rng.standard_normal(200))
    samples = 0.8 * drift * (1 + 0.02 * rng.standard_normal(200))
    assert turn_ratios(reference, samples, 10) == pytest.approx(np.full(20, 0.8), rel=0.03)
    low, high = ratio_interval(reference, samples, 10)
    assert low <= 0.8 <= high and high - low < 0.02  # the drift cancels within turns
    noisy = 0.8 * drift * (1 + 0.3 * rng.standard_normal(200))
    wide = ratio_interval(reference, noisy, 10)
    assert wide[1] - wide[0] > 2 * (high - low)
    assert ratio_interval(reference[:40], samples[:40], 10) is None  # four turns: too few
    assert ratio_interval(np.ones(50), np.full(50, 0.5), 10) == (0.5, 0.5)
    row = {"p50_ratio": 0.812, "p50_ratio_interval": (0.79, 0.831)}
    assert ratio_text(row) == "0.81x (95 % 0.79-0.83)" and ratio_text({"p50_ratio": 1.0}) == "1.00x"


def _lenet_variant(tmp_path, edit) -> str:
    model = lenet_300_100(random_lenet_weights())
    edit(model)
    path = tmp_path / "variant.onnx"
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize("edit", [
    lambda m: m.graph.node[1].input.__setitem__(0, "nowhere"),  # dangling input
    lambda m: m.graph.node[0].input.__setitem__(0, m.graph.node[1].output[0]),  # cycle
    lambda m: setattr(m.graph.node[0], "op_type", "NoSuchOp"),  # unknown op
], ids=["dangling", "cycle", "unknown-op"])
def test_broken_graphs_exit_3(tmp_path, edit, capsys):
    path = _lenet_variant(tmp_path, edit)
    before = open(path, "rb").read()
    assert main(["compress", path, "-o", str(tmp_path / "o.onnx")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid ONNX model" in err[0]
    assert not (tmp_path / "o.onnx").exists() and open(path, "rb").read() == before


def test_missing_onnxruntime_is_one_clear_line(tmp_path, lenet_file, monkeypatch, capsys):
    import onnx_merge.runtime

    monkeypatch.setattr(onnx_merge.runtime, "ort", None)
    assert main(["compress", str(lenet_file), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnx-merge: error: onnxruntime is not installed: pip install 'onnx-merge[cpu]' "
                   "(or 'onnx-merge[gpu]' on a CUDA machine)"]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("offset", [1, -1])
def test_opsets_outside_what_can_run_exit_3(tmp_path, lenet_file, offset, capsys):
    from onnx_merge.io import MIN_OPSET, max_runtime_opset

    model = onnx.load(lenet_file)
    model.opset_import[0].version = max_runtime_opset() + 1 if offset > 0 else MIN_OPSET - 1
    path = tmp_path / "opset.onnx"
    onnx.save(model, path)
    assert main(["compress", str(path), "-o", str(tmp_path / "o.onnx")]) == 3
    assert "opset" in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("before", [True, False])
def test_debug_is_accepted_before_or_after_the_command(before, monkeypatch):
    """The internal-error line says "rerun with --debug": that must work wherever the flag goes."""
    from onnx_merge.cli import build_parser

    args = ["--debug", "inspect", "m.onnx"] if before else ["inspect", "m.onnx", "--debug"]
    parsed = build_parser().parse_args(args)
    assert parsed.debug and not parsed.verbose
    assert not build_parser().parse_args(["inspect", "m.onnx"]).debug
    assert build_parser().parse_args(["-v", "inspect", "m.onnx"]).verbose


def test_kernel_times_take_each_nodes_median_and_sum_them_per_op_type():
    from onnx_merge.bench import kernel_times

    def event(node, op, us):
        return {"cat": "Node", "name": f"{node}_kernel_time", "dur": us, "args": {"op_name": op}}

    events = [event("a", "Conv", 100), event("a", "Conv", 300), event("a", "Conv", 120),  # median 120
              event("b", "Conv", 50), event("c", "Relu", 7), {"cat": "Session", "name": "model_run", "dur": 999},
              {"cat": "Node", "name": "a_fence_before", "dur": 1, "args": {"op_name": "Conv"}}]
    assert kernel_times(events) == pytest.approx({"Conv": 0.17, "Relu": 0.007})
    assert list(kernel_times(events)) == ["Conv", "Relu"]  # the dearest first
    assert kernel_times(events, skip=1) == pytest.approx({"Conv": 0.21})  # a's last two; b and c ran once


def test_bench_profile_prints_time_per_op_type_against_the_first_model(tmp_path, lenet_file, capsys):
    out = tmp_path / "small.onnx"
    assert main(["compress", str(lenet_file), "-o", str(out), "--no-verify", "--ratio", "0.5"]) == 0
    capsys.readouterr()
    report = tmp_path / "bench.json"
    assert main(["bench", str(lenet_file), str(out), "--runs", "5", "--warmup", "1", "--threads", "1", "--no-memory",
                 "--profile", "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "kernel time per op type" in text and "Gemm" in text and "all kernels" in text
    rows = json.loads(report.read_text())["details"]["results"]
    assert all(r["op_ms"]["Gemm"] > 0 for r in rows)
    assert not list(tmp_path.glob("*profile*")) and not list(Path.cwd().glob("onnxruntime_profile_*"))


@pytest.mark.parametrize("runs, block", [(7, 3), (6, 3), (5, 1), (2, 10)])
def test_bench_models_take_turns_in_blocks_each_after_an_untimed_run(runs, block):
    from itertools import groupby

    from onnx_merge.bench import run_order

    order = run_order(3, runs, block)
    assert [sum(timed for m, timed in order if m == model) for model in range(3)] == [runs] * 3
    turns = [(model, [timed for _, timed in run]) for model, run in groupby(order, key=lambda r: r[0])]
    assert [model for model, _ in turns] == [0, 1, 2] * -(-runs // block)  # turns go round the models
    for _, timed in turns:
        assert len(timed) <= block + (block > 1) and all(timed[block > 1:])
        assert (not timed[0]) == (block > 1)  # a block starts with a run that refills the caches
    with pytest.raises(ValueError):
        run_order(2, 5, 0)


def test_bench_times_in_a_child_whose_models_share_one_pool(lenet_file, monkeypatch):
    """Per-session pools keep spinning after a run and take a core from the next model, so one
    configuration's models are timed in a spawned process on one shared pool."""
    import onnx_merge.bench as bench

    seen = []
    real = bench._time_config

    def spy(paths, *args, shared_pool):
        seen.append((os.getpid(), shared_pool))
        return real(paths, *args, shared_pool=shared_pool)

    rows = bench.bench_models([lenet_file, lenet_file], threads=(1,), runs=3, warmup=1, memory=False)
    assert len(rows) == 2 and all(r["p50_ms"] > 0 for r in rows)
    monkeypatch.setattr(bench, "ProcessPoolExecutor", lambda *a, **k: (_ for _ in ()).throw(OSError("no processes")))
    monkeypatch.setattr(bench, "_time_config", spy)
    assert len(bench.bench_models([lenet_file], threads=(1,), runs=2, warmup=0, memory=False)) == 1
    assert seen == [(os.getpid(), False)]  # where no process can start: in this one, a pool per session


def test_an_interrupt_an_extension_turns_into_another_error_still_exits_130(monkeypatch, tmp_path, capsys):
    # what a Ctrl-C inside onnxruntime's lazy import looks like: the handler runs, the extension
    # swallows the interrupt and raises ImportError("initialization failed")
    import signal

    from onnx_merge import cli

    def interrupted_import(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None
        return 0

    monkeypatch.setitem(cli.COMMANDS, "inspect", interrupted_import)
    assert cli.main(["inspect", str(tmp_path / "m.onnx")]) == 130
    assert capsys.readouterr().err.strip() == "onnx-merge: interrupted"
