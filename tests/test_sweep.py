"""Sweeps: a small grid on a random-weight LeNet, run by the local pool and by Ray; the cache, a
failing job's row, the pick and the frontier."""

import csv
import json
import time

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_merge import report
from onnx_merge.api import compress_file
from onnx_merge.cli import main
from onnx_merge.data import Preprocess
from onnx_merge.errors import UsageError
from onnx_merge.evaluate import evaluate
from onnx_merge.math.pareto import pareto_front
from onnx_merge.models.lenet import lenet_300_100, random_lenet_weights
from onnx_merge.options import CompressOptions
from onnx_merge.runtime import make_session
from onnx_merge.sweep import EvalSpec, pick, run_sweep

RATIOS = [0.3, 0.7]
METHODS = ["prune", "merge"]


def _mismatched_model() -> onnx.ModelProto:
    """A model taking 10 features: the 784-feature eval data cannot run through it."""
    rng = np.random.default_rng(1)
    inits = [helper.make_tensor(n, onnx.TensorProto.FLOAT, s, rng.standard_normal(s).astype(np.float32).ravel())
             for n, s in (("w1", [16, 10]), ("b1", [16]), ("w2", [4, 16]), ("b2", [4]))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 10])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random LeNet and 300 random images labelled by its own predictions (original: 100 %)."""
    root = tmp_path_factory.mktemp("sweep")
    model = root / "lenet.onnx"
    onnx.save(lenet_300_100(random_lenet_weights()), model)
    onnx.save(_mismatched_model(), root / "small.onnx")
    x = np.random.default_rng(0).integers(0, 256, (300, 28, 28), dtype=np.uint8)
    session = make_session(model)
    logits = session.run(None, {"input": Preprocess(255.0)(x, 2)})[0]
    np.savez(root / "eval.npz", x=x, y=logits.argmax(1))
    return root


def _evaluation(files):
    return EvalSpec(str(files / "eval.npz"), scale=255.0)


def _sweep(files, out, engine="local", **kw):
    models = [str(files / "lenet.onnx"), str(files / "small.onnx")]
    return run_sweep(models, METHODS, [{"ratio": r} for r in RATIOS], _evaluation(files), out, engine=engine,
                     workers=2, progress=False, **kw)


@pytest.fixture(scope="module")
def local(files):
    return _sweep(files, files / "local", pick_rule=("accuracy_drop<=40", "macs"))


def _check_rows(result, files):
    rows = {(r["model"].rsplit("/", 1)[-1], r["method"], r.get("ratio")): r for r in result.rows}
    assert len(result.rows) == 2 * (1 + len(METHODS) * len(RATIOS)) and result.ran == len(result.rows)
    lenet = [r for r in result.rows if r["model"].endswith("lenet.onnx")]
    assert all(r["status"] == "ok" for r in lenet), [r.get("error") for r in lenet if r["status"] != "ok"]
    assert rows["lenet.onnx", "original", None]["accuracy"] == 100.0
    for r in lenet[1:]:
        assert r["accuracy_drop"] == pytest.approx(100.0 - r["accuracy"])
        assert r["macs_kept"] < 1 and r["params"] < rows["lenet.onnx", "original", None]["params"]
        assert -1 <= r["cosine"] <= 1
    # a row's accuracy is what compress + eval of the same configuration give
    row = rows["lenet.onnx", "merge", 0.7]
    direct = files / f"direct-{id(result)}.onnx"
    compress_file(files / "lenet.onnx", direct, CompressOptions(method="merge", ratio=0.7), verify=False)
    data = np.load(files / "eval.npz")
    assert row["accuracy"] == 100 * evaluate(direct, data["x"], data["y"], Preprocess(255.0), progress=False)["top1"]
    assert row["accuracy"] < 100.0
    # the model that cannot run on the data fails in its own rows, and only there
    small = [r for r in result.rows if r["model"].endswith("small.onnx")]
    assert all(r["status"] == "error" and r["error"] for r in small)


def test_local_sweep_rows_files_and_failures(local, files):
    _check_rows(local, files)
    out = files / "local"
    assert {p.name for p in out.iterdir()} >= {"sweep.json", "sweep.csv", "sweep.md", "sweep.png", "picked.onnx"}
    with open(out / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["key"] for r in table] == [r["key"] for r in local.rows]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "sweep.md").read_text()
    assert markdown.count("FAILED") == 5 and "Picked:" in markdown
    written = json.loads((out / "sweep.json").read_text())
    report.validate(written)  # the shipped report schema
    assert written["command"] == "sweep" and written["summary"]["jobs"] == 10 and written["summary"]["failed"] == 5
    assert len(written["details"]["rows"]) == 10 and written["summary"]["frontier"]["macs"]
    failed = written["details"]["rows"][-1]
    assert "784" in failed["error"] and "Traceback" in (out / "jobs" / f"{failed['key']}.log").read_text()


def test_pick_is_the_cheapest_row_meeting_the_rule(local, files):
    chosen = local.pick["row"]
    meets = [r for r in local.rows if r["status"] == "ok" and r["method"] != "original" and r["accuracy_drop"] <= 40]
    assert chosen["macs"] == min(r["macs"] for r in meets) and chosen["accuracy_drop"] <= 40
    assert "accuracy_drop<=40" in local.pick["why"]
    picked = onnx.load(files / "local" / "picked.onnx")
    assert {t.name: t.dims for t in picked.graph.initializer} == \
        {t.name: t.dims for t in onnx.load(chosen["output"]).graph.initializer}
    assert pick(local.rows, "accuracy_drop<=-1", "macs")["row"] is None
    with pytest.raises(UsageError, match="latency"):
        pick(local.rows, "accuracy_drop<=1", "latency")
    with pytest.raises(UsageError, match="no figure 'speed'"):
        pick(local.rows, "speed<=1", "macs")
    with pytest.raises(UsageError, match="FIELD<=VALUE"):
        pick(local.rows, "accuracy_drop~1", "macs")


def test_rerun_comes_from_the_cache_and_runs_only_what_is_missing(local, files):
    start = time.perf_counter()
    again = _sweep(files, files / "local")
    # the failed jobs are tried again; the finished ones are not
    assert again.ran == 5 and time.perf_counter() - start < 60
    assert [r["accuracy"] for r in again.rows if r["status"] == "ok"] == \
        [r["accuracy"] for r in local.rows if r["status"] == "ok"]
    assert all(r["cached"] for r in again.rows if r["status"] == "ok")
    wider = run_sweep([str(files / "lenet.onnx")], METHODS, [{"ratio": r} for r in RATIOS + [0.5]],
                      _evaluation(files), files / "local", progress=False)
    assert wider.ran == len(METHODS)
    assert sorted(r["ratio"] for r in wider.rows if not r["cached"]) == [0.5, 0.5]


def test_ray_engine_gives_the_same_rows(files, local):
    ray = pytest.importorskip("ray")  # CI installs the [ray] extra
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = _sweep(files, files / "ray", engine="ray")
    finally:
        ray.shutdown()
    _check_rows(result, files)
    assert [r.get("accuracy") for r in result.rows] == [r.get("accuracy") for r in local.rows]


def test_pareto_front():
    cost, score = [1, 2, 3, 2, 4, np.nan], [1, 3, 2, 3, 0, 9]
    assert pareto_front(cost, score).tolist() == [True, True, False, True, False, False]


def test_cli_sweep_and_usage_errors(files, capsys):
    out = files / "cli"
    args = ["sweep", str(files / "lenet.onnx"), "--ratios", "0.5", "--methods", "merge", "--data",
            str(files / "eval.npz"), "--scale", "255", "--out", str(out), "--workers", "1"]
    timed = ["--bench", "--bench-runs", "5"]
    assert main(args + timed + ["--pick", "accuracy_drop<=100,latency_ratio<=10", "--minimize", "latency"]) == 0
    printed = capsys.readouterr().out
    assert "lenet merge ratio=0.5" in printed and "least latency" in printed and (out / "picked.onnx").is_file()
    written = json.loads((out / "sweep.json").read_text())
    report.validate(written)
    assert written["options"]["ratios"] == [0.5] and written["options"]["scale"] == 255
    rows = written["details"]["rows"]
    assert all(r["latency_ms"] > 0 for r in rows) and rows[0]["latency_ratio"] == 1.0
    assert main(args + timed + ["--pick", "accuracy_drop<=-5"]) == 1  # served from the cache; nothing meets it
    assert "2 from the cache" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(args[:4] + ["--methods", "fold"] + args[6:])
    assert refused.value.code == 2
    assert main(args + ["--minimize", "latency", "--pick", "accuracy_drop<=1"]) == 2
    assert main(args + ["--input-key", "nothing"]) == 2
    assert main(args[:1] + [str(files / "missing.onnx")] + args[2:]) == 3
    fresh = args[:-4] + ["--out", str(files / "never")]
    assert main(fresh + ["--pick", "speed<=1"]) == 2 and not (files / "never").exists()  # refused before any work
    assert main(args[:3] + ["1.5"] + args[4:]) == 2


def test_fingerprint_follows_contents_not_names(tmp_path):
    from onnx_merge.sweep import fingerprint

    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x02ab")
    first = fingerprint(f"idx:{folder}")
    assert fingerprint(f"idx:{folder}:train") != first
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x02ac")
    assert fingerprint(f"idx:{folder}") != first
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=np.zeros(3))
    np.savez(b, x=np.zeros(3))
    assert fingerprint(str(a)) == fingerprint(str(b))


def test_cli_sweep_over_mac_budgets(files, capsys):
    """--target-macs values are settings like ratios: each row keeps at most its fraction of the MACs."""
    out = files / "budgets"
    args = ["sweep", str(files / "lenet.onnx"), "--target-macs", "0.6,0.3", "--methods", "merge", "--data",
            str(files / "eval.npz"), "--scale", "255", "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "lenet merge target_macs=0.3" in printed.err and "target_macs" in printed.out
    rows = json.loads((out / "sweep.json").read_text())["details"]["rows"]
    budgets = {r["target_macs"]: r for r in rows if r["method"] == "merge"}
    assert set(budgets) == {0.6, 0.3}
    for target, row in budgets.items():
        assert row["status"] == "ok" and target - 0.05 < row["macs_kept"] <= target
    with pytest.raises(SystemExit) as refused:  # one amount at a time
        main(args + ["--ratios", "0.5"])
    assert refused.value.code == 2


def test_a_job_sessions_use_its_share_of_the_cores(files):
    """Inside a sweep job, sessions made without a thread count take the job's share, not every core."""
    from onnx_merge.runtime import session_threads

    with session_threads(1):
        inside = make_session(files / "lenet.onnx").get_session_options().intra_op_num_threads
        named = make_session(files / "lenet.onnx", threads=2).get_session_options().intra_op_num_threads
    outside = make_session(files / "lenet.onnx").get_session_options().intra_op_num_threads
    assert (inside, named, outside) == (1, 2, 0)
