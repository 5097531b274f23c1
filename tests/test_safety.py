"""Lose nothing (issue #20): inputs and their data never change, a failing run leaves no file
and keeps the old one, every input is bounded, every error names its file or node."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_merge import compress
from onnx_merge import files
from onnx_merge.cli import main
from onnx_merge.io import external_files, load_arrays, save_model
from onnx_merge.models.lenet import lenet_300_100, random_lenet_weights
from tests.crafted import folding_bomb, if_model, unknown_domain_op
from tests.helpers import run

ROOT = Path(__file__).resolve().parents[1]


def lenet(path: Path, external: str | None = None) -> Path:
    model = lenet_300_100(random_lenet_weights())
    if external:
        onnx.save(model, path, save_as_external_data=True, location=external, size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error(capsys, code: int, expected: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == expected, err
    assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# -- refusals: nothing that is the input, its data or another output is ever written --------

@pytest.mark.parametrize("target", ["report=in", "report=data", "report=out", "out=data"])
def test_outputs_onto_the_input_its_data_or_each_other_are_refused(tmp_path, capsys, target):
    src = lenet(tmp_path / "in.onnx", external="in.onnx.data")
    before = snapshot(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    what, _, onto = target.partition("=")
    named = {"in": src, "data": tmp_path / "in.onnx.data", "out": out}[onto]
    out, report = (named, report) if what == "out" else (out, named)
    code = main(["compress", str(src), "-o", str(out), "--report", str(report)])
    one_error(capsys, code, 2, "refusing" if onto != "out" else "named twice")
    assert snapshot(tmp_path) == before


def test_verify_and_bench_reports_never_overwrite_a_model(tmp_path, capsys):
    a, b = lenet(tmp_path / "a.onnx"), lenet(tmp_path / "b.onnx", external="b.bin")
    before = snapshot(tmp_path)
    for argv in (["verify", str(a), str(b), "--report", str(b)], ["verify", str(a), str(b), "--report",
                 str(tmp_path / "b.bin")], ["bench", str(a), "--runs", "1", "--report", str(a)]):
        one_error(capsys, main(argv), 2, "refusing")
        assert snapshot(tmp_path) == before


def test_an_output_whose_data_name_is_the_inputs_data_keeps_the_input(tmp_path):
    """An export renamed without its data: in.onnx reads out.onnx.data. Writing out.onnx must not
    put its own weights there."""
    src = lenet(tmp_path / "in.onnx", external="out.onnx.data")
    before = snapshot(tmp_path)
    assert main(["compress", str(src), "-o", str(tmp_path / "out.onnx"), "--no-verify"]) == 0
    assert (tmp_path / "out.onnx.data").read_bytes() == before["out.onnx.data"]
    (data,) = external_files(tmp_path / "out.onnx")
    assert data.name != "out.onnx.data" and data.is_file()
    assert run(onnx.load(tmp_path / "in.onnx"), {"input": np.zeros((1, 784), np.float32)})  # still loads its data


@pytest.mark.parametrize("bad", ["folder", "missing-folder", "empty"])
def test_bad_output_paths_are_usage_errors(tmp_path, capsys, bad):
    src = lenet(tmp_path / "in.onnx")
    out = {"folder": str(tmp_path), "missing-folder": str(tmp_path / "nope" / "o.onnx"), "empty": ""}[bad]
    one_error(capsys, main(["compress", str(src), "-o", out]), 2, "onnx-merge: error:")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_report_in_a_missing_folder_is_refused_before_the_model_is_written(tmp_path, capsys):
    src = lenet(tmp_path / "in.onnx")
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "no" / "r.json")])
    one_error(capsys, code, 2, "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_named(tmp_path, capsys):
    src = lenet(tmp_path / "in.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_error(capsys, main(["compress", str(src), "-o", str(locked / "o.onnx")]), 2, "not writable", "locked")
    finally:
        locked.chmod(0o700)


def test_full_disk_is_named_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    src = lenet(tmp_path / "in.onnx")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx")])
    one_error(capsys, code, 3, "o.onnx", "no space left")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


# -- validate, work, prove, publish --------------------------------------------------------

@pytest.mark.parametrize("defect", ["unknown-domain", "duplicate-names", "fp64-conv", "group-0"])
def test_models_onnxruntime_refuses_leave_no_output_and_keep_the_old_one(tmp_path, capsys, defect):
    from tests.test_passes import conv_bn_relu_pool_conv

    model = conv_bn_relu_pool_conv()
    if defect == "unknown-domain":
        model = unknown_domain_op(model)
    elif defect == "duplicate-names":
        for node in model.graph.node:
            node.name = "same"
    elif defect == "fp64-conv":
        model = onnx.version_converter.convert_version(model, 17)
        for t in model.graph.initializer:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float64), t.name))
        for v in list(model.graph.input) + list(model.graph.output):
            v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    else:
        model.graph.node[0].attribute.append(onnx.helper.make_attribute("group", 0))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    out.write_bytes(b"the old output")
    code = main(["compress", str(src), "-o", str(out)])
    assert code in (2, 3)
    one_error(capsys, code, code, "onnx-merge: error:")
    assert out.read_bytes() == b"the old output"
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


def test_failing_verification_leaves_the_old_output(tmp_path):
    from onnx_merge.api import compress_file
    from onnx_merge.errors import VerificationError
    from onnx_merge.options import CompressOptions
    from onnx_merge.verify import Tolerance

    src, out = lenet(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    out.write_bytes(b"old")
    with pytest.raises(VerificationError, match="not written"):
        compress_file(src, out, CompressOptions(ratio=0.5), tolerance=Tolerance(atol=0, rtol=0))
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


def test_a_crash_between_the_renames_leaves_the_old_model_whole(tmp_path, monkeypatch):
    """The data file is renamed first under a fresh name; the model, renamed last, is what
    switches. A crash before that leaves the old model reading its own, unchanged data."""
    src, out = lenet(tmp_path / "in.onnx", external="in.data"), tmp_path / "out.onnx"
    assert main(["compress", str(src), "-o", str(out), "--ratio", "0.3", "--no-verify"]) == 0
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 784)).astype(np.float32)}
    old_outputs = run(onnx.load(out), feeds)
    before = snapshot(tmp_path)
    real_replace = os.replace

    def crash_on_model(a, b):
        if Path(b) == out:
            raise KeyboardInterrupt  # as a SIGINT/SIGTERM there would
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", crash_on_model)
    assert main(["compress", str(src), "-o", str(out), "--ratio", "0.7", "--no-verify"]) == 130
    assert snapshot(tmp_path) == before
    np.testing.assert_array_equal(run(onnx.load(out), feeds)[0], old_outputs[0])


def test_an_inline_rewrite_removes_the_data_the_old_output_read_and_nothing_else(tmp_path):
    ext, inline, out = lenet(tmp_path / "ext.onnx", "ext.bin"), lenet(tmp_path / "inline.onnx"), tmp_path / "o.onnx"
    (tmp_path / "unrelated.data").write_bytes(b"keep me")
    assert main(["compress", str(ext), "-o", str(out), "--no-verify"]) == 0
    assert (tmp_path / "o.onnx.data").is_file()
    assert main(["compress", str(inline), "-o", str(out), "--no-verify"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["ext.bin", "ext.onnx", "inline.onnx", "o.onnx", "unrelated.data"]


def test_outputs_take_the_inputs_mode(tmp_path):
    src = lenet(tmp_path / "in.onnx", external="in.data")
    src.chmod(0o640)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["compress", str(src), "-o", str(out), "--report", str(report), "--no-verify"]) == 0
    (data,) = external_files(out)
    assert [p.stat().st_mode & 0o777 for p in (out, data, report)] == [0o640, 0o640, 0o644]


def test_stale_staging_folders_of_dead_runs_are_removed(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale, alive, foreign, young = (tmp_path / f".onnx-merge-{pid}-abc", tmp_path / f".onnx-merge-{os.getppid()}-def",
                                    tmp_path / ".onnx-merge-notours", tmp_path / f".onnx-merge-{pid}-new")
    for folder, owner in ((stale, pid), (alive, os.getppid()), (foreign, pid), (young, pid)):
        folder.mkdir()
        (folder / "owner").write_text(f"{socket.gethostname()} {owner}\n")
        (folder / "out.onnx").write_bytes(b"half")
        if folder is not young:  # a folder touched within files.STALE_AFTER_S may be a live writer's
            os.utime(folder, (time.time() - 2 * files.STALE_AFTER_S,) * 2)
    files.write_text_atomic(tmp_path / "r.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, foreign.name, young.name, "r.json"])


def test_sigterm_during_the_save_leaves_no_temporary_folder(tmp_path):
    """The kill test: SIGTERM while the staged model is being flushed. Exit 143, one line, no
    staging folder, no output."""
    work, marker = tmp_path / "work", tmp_path / "staged"
    work.mkdir()
    src = lenet(work / "in.onnx")
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from onnx_merge import files
        from onnx_merge.cli import main
        real = files.finish
        def slow(path, mode):
            real(path, mode)
            pathlib.Path({str(marker)!r}).touch()
            time.sleep(30)
        files.finish = slow
        sys.exit(main(["compress", {str(src)!r}, "-o", {str(work / 'out.onnx')!r}, "--no-verify"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(p.name.startswith(".onnx-merge-") for p in work.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "onnx-merge: interrupted"
    assert sorted(os.listdir(work)) == ["in.onnx"]


def test_sigint_while_starting_up_prints_no_traceback(tmp_path):
    src = lenet(tmp_path / "in.onnx")
    exe = Path(sys.executable).parent / "onnx-merge"
    for delay in (0.5, 1.0, 1.5):  # while onnx and onnxruntime load (the interpreter's own start is its own)
        proc = subprocess.Popen([str(exe), "inspect", str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert proc.returncode in (0, 130, -signal.SIGINT), err


# -- bounded inputs ------------------------------------------------------------------------

def test_the_folding_bomb_is_refused_naming_the_node(tmp_path, capsys):
    src = tmp_path / "bomb.onnx"
    onnx.save(folding_bomb(), src)
    assert src.stat().st_size < 4096
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx")])
    one_error(capsys, code, 3, "'bomb'", "ConstantOfShape", "500,000,000 elements", "--skip-fold")
    assert not (tmp_path / "o.onnx").exists()
    small = folding_bomb(rows=50, cols=100)  # the same shape of graph, small: folded, compressed
    out, rep = compress(small, ratio=0.5)
    assert [n.op_type for n in out.graph.node].count("ConstantOfShape") == 0 and rep["layers"]


def test_the_folding_bomb_stays_under_a_gibibyte(tmp_path):
    src = tmp_path / "bomb.onnx"
    onnx.save(folding_bomb(), src)
    script = ("import resource, sys; from onnx_merge.cli import main; "
              f"code = main(['compress', {str(src)!r}, '-o', {str(tmp_path / 'o.onnx')!r}]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 3, done.stderr
    assert int(done.stdout.split()[-1]) * 1024 < 2**30


def test_fold_caps_are_options(tmp_path, capsys):
    src = tmp_path / "b.onnx"
    onnx.save(folding_bomb(rows=50, cols=100), src)
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--fold-max-elements", "1000"])
    one_error(capsys, code, 3, "5,000 elements", "1,000 elements")
    assert main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--skip-fold", "--no-verify"]) == 0
    assert "ConstantOfShape" in [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node]


def _deflated_zeros(path: Path, shape, dtype=np.float32, cut: int | None = None) -> None:
    """An .npz whose member is zeros, deflated chunk by chunk (never whole in memory)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("x.npy", "w",
                                                                                   force_zip64=True) as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        left = int(np.prod(shape)) * np.dtype(dtype).itemsize if cut is None else cut
        chunk = bytes(1 << 20)
        while left > 0:
            fh.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)


def test_an_npz_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.npz"
    _deflated_zeros(bomb, (3, 1024, 1024))  # 12 MiB of zeros in a few KB
    assert bomb.stat().st_size < 100_000
    monkeypatch.setenv("ONNX_MERGE_MAX_DATA_MB", "4")
    start = time.perf_counter()
    with pytest.raises(Exception, match="over the cap of 4 MiB; set ONNX_MERGE_MAX_DATA_MB"):
        load_arrays(bomb)
    assert time.perf_counter() - start < 1
    monkeypatch.setenv("ONNX_MERGE_MAX_DATA_MB", "64")
    assert load_arrays(bomb)["x"].shape == (3, 1024, 1024)


@pytest.mark.parametrize("kind", ["truncated", "npy", "pickle", "not-zip"])
def test_bad_data_files_are_named(tmp_path, capsys, kind):
    src, data = lenet(tmp_path / "in.onnx"), tmp_path / "d.npz"
    if kind == "truncated":
        _deflated_zeros(data, (4, 784), cut=1000)
    elif kind == "npy":
        np.save(data, np.zeros((4, 784), np.float32))
        (tmp_path / "d.npz.npy").rename(data)
    elif kind == "pickle":
        np.savez(data, x=np.array([{"a": 1}], dtype=object))
    else:
        data.write_bytes(b"not an archive at all")
    code = main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--inputs", str(data)])
    word = {"truncated": "truncated", "npy": "single .npy", "pickle": "pickle", "not-zip": "not a readable"}[kind]
    one_error(capsys, code, 3, "d.npz", word)
    assert not (tmp_path / "o.onnx").exists()


def test_random_inputs_are_bounded_and_batches_checked(tmp_path, capsys):
    src = lenet(tmp_path / "in.onnx")
    one_error(capsys, main(["bench", str(src), "--batch", "100000000", "--runs", "1"]), 2, "--batch", "MiB")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 784), np.float32), y=np.zeros(4, np.int64))
    one_error(capsys, main(["eval", str(src), "--data", str(tmp_path / "d.npz"), "--batch", "0"]), 2, "--batch")


# -- models whose files lie ----------------------------------------------------------------

def _external(tmp_path: Path, **edit) -> Path:
    src = lenet(tmp_path / "in.onnx", external="in.data")
    model = onnx.load(src, load_external_data=False)
    tensor = model.graph.initializer[0]
    for entry in list(tensor.external_data):
        if entry.key in edit:
            if edit[entry.key] is None:
                tensor.external_data.remove(entry)
            else:
                entry.value = edit[entry.key]
    onnx.save(model, src)
    return src


@pytest.mark.parametrize("edit,word", [({"offset": "1.5"}, "non-integer"), ({"length": "ten"}, "non-integer"),
                                       ({"offset": "-4"}, "beyond the end"), ({"length": "99999999999"}, "beyond")])
def test_bad_external_data_keys_are_named(tmp_path, capsys, edit, word):
    src = _external(tmp_path, **edit)
    one_error(capsys, main(["compress", str(src), "-o", str(tmp_path / "o.onnx")]), 3, "in.onnx", word)


def test_an_external_tensor_without_a_length_reads_only_its_own_bytes(tmp_path):
    src = _external(tmp_path, length=None)
    assert main(["compress", str(src), "-o", str(tmp_path / "o.onnx")]) == 0
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_initializer_dims_that_disagree_with_the_data_are_named(tmp_path, capsys):
    model = lenet_300_100(random_lenet_weights())
    model.graph.initializer[1].dims[0] += 1
    onnx.save(model, tmp_path / "in.onnx")
    code = main(["compress", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "o.onnx")])
    one_error(capsys, code, 3, "in.onnx", repr(model.graph.initializer[1].name), "holds")


def test_sparse_initializers_get_the_external_data_path_check(tmp_path, capsys):
    model = lenet_300_100(random_lenet_weights())
    values = onnx.numpy_helper.from_array(np.ones(2, np.float32), "sp")
    indices = onnx.numpy_helper.from_array(np.array([0, 5], np.int64), "sp_idx")
    onnx.external_data_helper.set_external_data(values, "../../etc/passwd")
    values.ClearField("raw_data")
    model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [10]))
    onnx.save(model, tmp_path / "in.onnx")
    code = main(["compress", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "o.onnx")])
    one_error(capsys, code, 3, "outside the model's folder")


# -- subgraphs -------------------------------------------------------------------------------

def test_if_subgraphs_pass_through_at_ratio_zero_unchanged(tmp_path):
    """Like silero-vad: an If on a computed condition, Conv/MatMul and Constant nodes in both
    branches reading the outer scope. Folding touches neither body; outputs are identical."""
    model = if_model()
    src, out = tmp_path / "vad.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    assert main(["compress", str(src), "-o", str(out), "--ratio", "0"]) == 0
    small = onnx.load(out)
    bodies = [a.g.SerializeToString() for m in (model, small) for n in m.graph.node for a in n.attribute
              if a.type == onnx.AttributeProto.GRAPH]
    assert bodies[:2] == bodies[2:]
    assert "Constant" not in [n.op_type for n in small.graph.node]  # the outer computed weight was folded
    rng = np.random.default_rng(1)
    for sign in (1, -1):  # both branches
        feeds = {"x": sign * np.abs(rng.standard_normal((1, 3, 4, 4))).astype(np.float32)}
        for a, b in zip(run(model, feeds), run(small, feeds)):
            np.testing.assert_array_equal(a, b)


def test_third_party_warnings_are_log_lines_shown_with_v_only(tmp_path):
    src = lenet(tmp_path / "in.onnx")
    script = textwrap.dedent(f"""
        import sys, warnings
        from onnx_merge import api
        from onnx_merge.cli import main
        real = api.compress
        def noisy(*a, **k):
            warnings.warn("something a library says", UserWarning)
            return real(*a, **k)
        api.compress = noisy
        sys.exit(main(["compress", {str(src)!r}, "-o", {str(tmp_path / 'o.onnx')!r}, "--ratio", "0"] + sys.argv[1:]))
    """)
    quiet, verbose = (subprocess.run([sys.executable, "-c", script, *flags], capture_output=True, text=True, cwd=ROOT)
                      for flags in ([], ["-v"]))
    assert quiet.returncode == verbose.returncode == 0
    assert quiet.stderr == "" and "something a library says" not in quiet.stdout
    assert "WARNING" in verbose.stderr and "something a library says" in verbose.stderr


def test_save_model_refuses_the_source_and_its_data(tmp_path):
    src = lenet(tmp_path / "in.onnx", external="in.data")
    model = onnx.load(src)
    from onnx_merge.errors import UsageError

    for target in (src, tmp_path / "in.data"):
        with pytest.raises(UsageError, match="refusing"):
            save_model(model, target, external=False, source=src)
