"""classify against hostile models and moments: NaN logits, a fixed batch size, Ctrl-C at any time, and a
--resume that must refuse anything but the run it continues (issue 9)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmnist_onnx.journal import journal_path
from fmnist_onnx.table import read_rows
from fmnist_onnx.testing import CLASSIFY_AFTER_CHUNK, CLASSIFY_BEFORE_ENGINE, CLASSIFY_ENGINE_READY, MAIN_STARTED
from harness import assert_one_line_error, run_cli, save_classifier


def _nan_model(path: Path) -> Path:
    """A valid [N,1,28,28] -> [N,10] model whose logits are NaN: 0 / 0."""
    from onnx import helper, numpy_helper

    zeros = numpy_helper.from_array(np.zeros((784, 10), np.float32), "w")
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("Div", ["mm", "zero"], ["logits"])]
    return save_classifier(path, "nan", nodes, [zeros, zero])


def _fixed_batch_model(src: Path, dest: Path, batch: int) -> Path:
    """``src`` with its batch dimension fixed, as an exporter run without a dynamic axis leaves it."""
    import onnx

    m = onnx.load(str(src))
    for v in [*m.graph.input, *m.graph.output]:
        dim = v.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = batch
    onnx.save(m, str(dest))
    return dest


def test_nan_logits_are_error_rows_not_a_class(test_pngs, tmp_path):
    out = tmp_path / "nan.jsonl"
    proc = run_cli("classify", test_pngs / "Bag", "-m", _nan_model(tmp_path / "nan.onnx"), "-o", out, "--quiet")
    assert proc.returncode == 3, proc.stderr  # some files failed: all of them
    rows = list(read_rows(out))
    assert len(rows) == 1000
    assert all(r["label"] is None and r["score"] is None and "non-finite logits" in r["error"] for r in rows)


@pytest.mark.parametrize("batch", [1, 7])
def test_a_fixed_batch_model_gives_the_dynamic_models_rows(batch, onnx_model, test_pngs, tmp_path):
    fixed = _fixed_batch_model(onnx_model, tmp_path / "fixed.onnx", batch)
    rows = {}
    for name, model in (("dynamic", onnx_model), ("fixed", fixed)):
        # 1000 files, batches of 64: every batch, and the last one, is cut to the model's size
        proc = run_cli("classify", test_pngs / "Coat", "-m", model, "-o", tmp_path / f"{name}.csv", "--quiet",
                       "--batch-size", "64")
        assert proc.returncode == 0, proc.stderr
        rows[name] = [(r["path"], r["index"], r["score"]) for r in read_rows(tmp_path / f"{name}.csv")]
    assert len(rows["fixed"]) == 1000 and rows["fixed"] == rows["dynamic"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
@pytest.mark.parametrize("point", [f"{MAIN_STARTED}:1", f"{CLASSIFY_BEFORE_ENGINE}:1", f"{CLASSIFY_ENGINE_READY}:1",
                                   f"{CLASSIFY_AFTER_CHUNK}:1"])
def test_a_stop_signal_at_any_moment_is_one_line_and_128_plus_its_number(sig, point, onnx_model, test_pngs,
                                                                        tmp_path):
    """Held at each stage of its start (before the imports, before the workers and onnxruntime, before the
    journal) and in the run, a Ctrl-C gives 130 and a SIGTERM 143, one line and no traceback; a journal only
    once it has rows."""
    import os

    from harness import Held

    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(test_pngs), "-m", str(onnx_model), "-o", str(out),
           "--quiet"]
    with Held(cmd, point, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
              text=True) as held:
        pid = held.wait()
        if sig == signal.SIGINT:
            os.killpg(pid, sig)  # as a terminal's Ctrl-C: the whole process group
        else:
            os.kill(pid, sig)  # as `kill PID` or a service manager: the command's process alone
        _, stderr = held.proc.communicate(timeout=120)
    assert held.proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr and "Error" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("Interrupted"), stderr
    assert not out.exists()
    assert journal_path(out).exists() == point.startswith(CLASSIFY_AFTER_CHUNK)
    if journal_path(out).exists():
        assert "--resume" in stderr


@pytest.fixture(scope="module")
def killed_run(onnx_model, test_pngs, tmp_path_factory) -> dict:
    """A classify run over the 10,000 test PNGs, SIGKILLed once its first chunk is in the journal."""
    from harness import Held

    out = tmp_path_factory.mktemp("killed") / "preds.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(test_pngs), "-m", str(onnx_model), "-o", str(out),
           "--workers", "1", "--quiet"]
    with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:1", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.PIPE) as held:
        import os

        os.killpg(held.wait(), signal.SIGKILL)
    assert journal_path(out).exists() and not out.exists()
    return {"out": out, "journal": journal_path(out).read_bytes()}


@pytest.mark.parametrize(("change", "names"), [
    (["--invert", "yes"], "--invert (auto then, yes now)"),
    (["--top-k", "2"], "--top-k (1 then, 2 now)"),
    (["--no-recursive"], "--no-recursive (off then, on now)"),
    (["-m", "{other}"], "the model file"),
    (["{pngs}/Bag"], "the inputs"),
])
def test_resume_refuses_another_run_in_one_line(change, names, killed_run, onnx_model, test_pngs, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(onnx_model.read_bytes() + b"\n")  # another file: the same graph, other bytes
    args = [a.format(pngs=test_pngs, other=other) for a in change]
    inputs = [a for a in args if a.startswith(str(test_pngs))] or [str(test_pngs)]
    options = [a for a in args if a not in inputs]
    if "-m" not in options:
        options += ["-m", str(onnx_model)]
    proc = run_cli("classify", *inputs, *options, "-o", killed_run["out"], "--resume")
    assert_one_line_error(proc, 2, names)
    assert "was written by another run" in proc.stderr and "--overwrite" in proc.stderr
    assert journal_path(killed_run["out"]).read_bytes() == killed_run["journal"]  # untouched


def test_resume_of_the_same_run_finishes_it(killed_run, onnx_model, test_pngs, tmp_path):
    import shutil

    out = tmp_path / "preds.csv"  # a copy: the refusals above use the fixture's journal
    shutil.copy(journal_path(killed_run["out"]), journal_path(out))
    from fmnist_onnx.classify import identity_path

    shutil.copy(identity_path(killed_run["out"]), identity_path(out))
    proc = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files"] == 10000 and 0 < summary["resumed"] < 10000
    assert len({r["path"] for r in read_rows(out)}) == 10000
    assert not identity_path(out).exists() and not journal_path(out).exists()


def test_a_journal_without_its_run_record_is_not_resumed(killed_run, onnx_model, test_pngs, tmp_path):
    out = tmp_path / "preds.csv"
    journal_path(out).write_bytes(killed_run["journal"])  # as an older version, or a hand copy, leaves it
    proc = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--resume")
    assert_one_line_error(proc, 2, "no record of the run")
