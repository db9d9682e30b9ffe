"""`fmnist-onnx classify` as users run it: real PNG folders, real processes, real kills."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from fmnist_onnx.journal import journal_path
from fmnist_onnx.table import read_rows
from fmnist_onnx.testing import CLASSIFY_AFTER_CHUNK
from harness import Held, assert_one_line_error, run_cli, wait_for_exit

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def index_of(path: str) -> int:
    """export-png names files by their index in the split."""
    return int(Path(path).stem)


@pytest.fixture(scope="module")
def clean(onnx_model, test_pngs, tmp_path_factory) -> dict:
    """One uninterrupted run over the 10,000 test PNGs: {path: index}, its summary and its output."""
    out = tmp_path_factory.mktemp("clean") / "preds.csv"
    proc = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = list(read_rows(out))
    return {"labels": {r["path"]: r["index"] for r in rows}, "summary": json.loads(proc.stdout), "out": out,
            "rows": rows}


def test_labels_equal_onnxruntime_on_the_dataset_tensors(clean, onnx_model):
    from fmnist_onnx.data import load_split
    from fmnist_onnx.runtime import open_session

    split = load_split(False)
    expected = open_session(onnx_model, "cpu").run(split.as_float().numpy()).argmax(1)
    got = np.full(len(expected), -1)
    for path, index in clean["labels"].items():
        got[index_of(path)] = index
    np.testing.assert_array_equal(got, expected)  # PNG is lossless: every label is the same
    s = clean["summary"]
    assert (s["files"], s["classified"], s["failed"], s["skipped"]) == (10000, 10000, 0, 0)
    assert s["accuracy_pct"] == pytest.approx(100 * (expected == split.labels.numpy()).mean(), abs=0.005)
    recall = {m["label"]: m["recall"] for m in s["per_class"]}
    assert recall["Trouser"] == pytest.approx((expected[split.labels.numpy() == 1] == 1).mean(), abs=1e-4)
    png = Path(s["confusion_png"])
    assert png == clean["out"].with_name("preds.confusion.png") and Image.open(png).size[0] > 300


def test_rows_are_in_walk_order_with_scores(clean, onnx_model):
    paths = [r["path"] for r in clean["rows"]]
    assert paths == sorted(paths, key=lambda p: (Path(p).parent.name, Path(p).name))
    assert all(r["error"] is None for r in clean["rows"])
    # the score is the softmax probability of the row's class, from onnxruntime's own logits for that image
    from fmnist_onnx.data import load_split

    split = load_split(False)
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    some = clean["rows"][::197]  # 51 files, every class
    x = split.as_float().numpy()[[index_of(r["path"]) for r in some]]
    logits = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for r, p in zip(some, probs, strict=True):
        assert r["index"] == p.argmax() and r["score"] == pytest.approx(p.max(), abs=1e-5), r


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, test_pngs) -> dict:
    """Broken files of every kind, and odd but valid images, nested, with awkward names."""
    root = tmp_path_factory.mktemp("odd") / "in"
    src = np.asarray(Image.open(next((test_pngs / "Trouser").glob("*.png"))))
    cutout = np.zeros((28, 28, 4), np.uint8)  # a dark garment on a transparent background
    cutout[..., :3] = (255 - src)[..., None]
    cutout[..., 3] = np.where(src > 0, 255, 0)
    big = Image.new("L", (900, 700), 255)  # a big photo: dark garment on white, aspect ratio kept
    big.paste(Image.fromarray(255 - src).resize((560, 560)), (170, 70))
    valid = {
        "a b/é accents/plain.png": Image.fromarray(src),
        "a b/sixteen bit.png": Image.fromarray(src.astype(np.uint16) * 257),
        "palette.png": Image.fromarray(src).convert("P"),
        "rgba.png": Image.fromarray(cutout),
        "nested/deeper/inverted.png": Image.fromarray(255 - src),
        "large.png": big,
        "photo.jpg": Image.fromarray(255 - src).resize((300, 300)).convert("RGB"),
        "bitmap.bmp": Image.fromarray(src),
        "web.webp": Image.fromarray(src),
    }
    for rel, im in valid.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel, **({"lossless": True} if rel.endswith(".webp") else {}))
    good = (root / "a b/é accents/plain.png").read_bytes()
    broken = {
        "broken/empty.png": b"",
        "broken/truncated.png": good[: len(good) // 2],
        "broken/text.png": b"I am not a picture\n",
        "broken/bomb.png": _bomb(30000, 30000),
    }
    for rel, data in broken.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink(root / "nowhere.png", root / "broken" / "dangling.png")
    os.mkfifo(root / "broken" / "pipe.png")
    (root / "notes.txt").write_text("not an image: skipped, counted")
    (root / "broken" / "data.csv").write_text("a,b\n")
    errors = [*broken, "broken/dangling.png", "broken/pipe.png"]  # unreadable files: see test_unreadable_...
    return {"root": root, "valid": list(valid), "errors": errors, "skipped": 2}


def _bomb(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_every_file_gets_exactly_one_row_broken_ones_an_error(odd_folder, onnx_model, tmp_path):
    out = tmp_path / "odd.jsonl"
    proc = run_cli("classify", odd_folder["root"], "-m", onnx_model, "-o", out, "--top-k", "2")
    assert proc.returncode == 3, proc.stderr  # some files failed
    assert "Traceback" not in proc.stderr
    rows = {os.path.relpath(r["path"], odd_folder["root"]): r for r in read_rows(out)}
    assert sorted(rows) == sorted(odd_folder["valid"] + odd_folder["errors"])
    for rel in odd_folder["errors"]:
        assert rows[rel]["error"] and rows[rel]["label"] is None, rel
    for rel in odd_folder["valid"]:  # every form of the same trouser image is a trouser
        assert rows[rel]["error"] is None and rows[rel]["label"] == "Trouser", (rel, rows[rel])
        assert rows[rel]["label_2"] and rows[rel]["score_2"] <= rows[rel]["score"]
    assert "too large" in rows["broken/bomb.png"]["error"]
    assert rows["broken/dangling.png"]["error"] == "dangling symbolic link"
    assert "classified" in proc.stderr and f"{len(odd_folder['errors'])} failed" in proc.stderr
    assert f"{odd_folder['skipped']} other files skipped" in proc.stderr


def test_unreadable_files_and_folders_are_error_rows(nobody, test_pngs, onnx_model):
    """chmod stops every user but root, and CI runs as root: the run is made as `nobody` there (conftest)."""
    root = nobody.folder / "unreadable"
    (root / "locked").mkdir(parents=True)
    bags = sorted((test_pngs / "Bag").glob("*.png"))[:3]
    for png in bags:
        (root / png.name).write_bytes(png.read_bytes())
    (root / "secret.png").write_bytes(bags[0].read_bytes())
    (root / "secret.png").chmod(0)
    (root / "locked" / "inside.png").write_bytes(bags[0].read_bytes())
    (root / "locked").chmod(0)
    model = root.parent / "unreadable.onnx"
    model.write_bytes(onnx_model.read_bytes())
    out = root.parent / "unreadable.jsonl"
    proc = nobody.run_cli("classify", root, "-m", model, "-o", out)
    assert proc.returncode == 3, proc.stderr
    rows = {os.path.relpath(r["path"], root): r for r in read_rows(out)}
    assert sorted(rows) == sorted([png.name for png in bags] + ["secret.png", "locked"])
    assert all(rows[png.name]["error"] is None and rows[png.name]["label"] == "Bag" for png in bags), rows
    assert "Permission denied" in rows["secret.png"]["error"] and rows["secret.png"]["label"] is None
    assert rows["locked"]["error"] == "cannot list folder: Permission denied"


def test_product_photos_are_classified_as_well_as_the_test_set(clean, test_pngs, onnx_model, tmp_path):
    """Dark garments on white, bigger and wider than 28x28, as JPEG: --invert auto handles them."""
    root = tmp_path / "shop"
    for png in sorted(test_pngs.rglob("*.png"))[::50]:  # 200 images, all classes
        img = 255 - np.asarray(Image.open(png))
        garment = Image.fromarray(img).resize((112, 112), Image.Resampling.LANCZOS)
        photo = Image.new("L", (180, 140), 255)
        photo.paste(garment, (34, 14))
        (root / png.parent.name).mkdir(parents=True, exist_ok=True)
        photo.convert("RGB").save(root / png.parent.name / f"{png.stem}.jpg", quality=92)
    out = tmp_path / "shop.csv"
    proc = run_cli("classify", root, "-m", onnx_model, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    accuracy = json.loads(proc.stdout)["accuracy_pct"]
    assert accuracy >= clean["summary"]["accuracy_pct"] - 6, accuracy
    proc = run_cli("classify", root, "-m", onnx_model, "-o", tmp_path / "no.csv", "--invert", "no", "--json")
    assert json.loads(proc.stdout)["accuracy_pct"] < 40  # without the inversion: much worse


def _journal_rows(journal: Path) -> int:
    try:
        return journal.read_bytes().count(b"\n") - 1  # minus the header
    except FileNotFoundError:
        return 0


def _start_classify(folder: Path, model: Path, out: Path, workers: int, chunks: int, *args: str) -> Held:
    """A real `classify` in its own process group, held (fmnist_onnx/testing.py) once ``chunks`` chunks of rows
    are in its journal: what the test does next lands mid-run, on a loaded machine as on a fast one."""
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(model), "-o", str(out),
           "--workers", str(workers), *args]
    held = Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:{chunks}", start_new_session=True, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True)
    try:
        held.wait()
    except BaseException:
        held.__exit__(None, None, None)
        raise
    return held


def test_sigkill_then_resume_gives_every_file_exactly_once(clean, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    with _start_classify(test_pngs, onnx_model, out, workers=1, chunks=2) as held:
        written = _journal_rows(journal_path(out))
        os.killpg(held.proc.pid, signal.SIGKILL)  # the parent and its workers, with no chance to clean up
        assert held.proc.wait() == -signal.SIGKILL
    assert not out.exists()
    done = _journal_rows(journal_path(out))
    assert done == written and 0 < done < 10000  # the two chunks, all there

    refused = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out)
    assert_one_line_error(refused, 2, "--resume")
    resumed = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed"] == done and summary["files"] == 10000
    assert summary["accuracy_pct"] == clean["summary"]["accuracy_pct"]
    rows = list(read_rows(out))
    assert len(rows) == 10000 and {r["path"]: r["index"] for r in rows} == clean["labels"]
    assert not journal_path(out).exists()
    again = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--resume", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["already_complete"]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.parametrize("inference", ["workers", "batched"])
def test_a_worker_killed_midway_loses_nothing(inference, clean, test_pngs, onnx_model, tmp_path):
    """Batched: the chunks of the killed worker's pool are decoded again into their slots of shared memory."""
    out = tmp_path / "preds.csv"
    with _start_classify(test_pngs, onnx_model, out, 2, 2, "--inference", inference, "--provider", "cpu") as held:
        children = _children(held.proc.pid)  # the decoding workers, then the inference process (batched)
        assert len(children) == 2 + (inference == "batched"), children
        os.kill(children[1], signal.SIGKILL)  # as the OOM killer would
        assert wait_for_exit(children[1:2]) == []
        held.release()
        _, stderr = held.proc.communicate(timeout=300)
    assert held.proc.returncode == 0, stderr
    assert "a worker process died" in stderr
    assert {r["path"]: r["index"] for r in read_rows(out)} == clean["labels"]


def test_existing_output_is_refused_unless_overwrite(clean, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    out.write_text("keep me\n")
    proc = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", out)
    assert_one_line_error(proc, 2, "--overwrite")
    assert out.read_text() == "keep me\n"
    proc = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", out, "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert len(list(read_rows(out))) == 1000


def test_stdout_gets_the_csv_and_stderr_the_rest(onnx_model, test_pngs):
    proc = run_cli("classify", test_pngs / "Sandal", "-m", onnx_model, "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 1000 and list(rows[0]) == ["path", "label", "index", "score", "label_2", "score_2",
                                                  "label_3", "score_3", "error", "true_label"]
    from fmnist_onnx.runtime import classify_provider

    provider, _ = classify_provider("auto")  # runtime.CLASSIFY_AUTO_DEVICE's rule
    assert f"provider: {provider} (auto)" in proc.stderr and "1000 of 1000 files classified" in proc.stderr


def _classify_logged(folder, model, out, *args) -> str:
    """A run with its stderr going to a file, not a terminal (CI, nohup); the file's text."""
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(model), "-o",
                               str(out), *args], stdout=subprocess.DEVNULL, stderr=f)
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def test_stderr_to_a_file_gets_progress_lines(onnx_model, test_pngs, tmp_path):
    lines = _classify_logged(test_pngs / "Bag", onnx_model, tmp_path / "p.csv").splitlines()
    end = next(i for i, x in enumerate(lines) if x.startswith("classify: 1,000 images, "))  # whatever the time
    assert lines[end + 1] == "1000 of 1000 files classified, 0 failed.", lines  # then the summary (stderr too)
    assert not any("\r" in x for x in lines)  # no bar in a log
    # one speed figure per run: the summary's images/s; the progress lines before it name theirs the same
    assert "/s" not in lines[end] and re.findall(r"/s\b", "\n".join(lines[end:])) == ["/s"], lines
    assert all(re.findall(r"[\d,.]+ (\w+)/s", x) in ([], ["images"]) for x in lines), lines


def test_quiet_writes_no_progress(onnx_model, test_pngs, tmp_path):
    text = _classify_logged(test_pngs / "Bag", onnx_model, tmp_path / "p.csv", "--quiet")
    assert text.startswith("1000 of 1000 files classified") and "classify: " not in text, text  # the summary alone


@pytest.mark.parametrize("provider", ["auto", "cpu"])
def test_json_records_which_provider_ran_and_why(provider, onnx_model, test_pngs, tmp_path):
    from fmnist_onnx.runtime import classify_provider

    proc = run_cli("classify", test_pngs / "Sandal", "-m", onnx_model, "-o", tmp_path / "p.csv", "--provider",
                   provider, "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["provider"], summary["provider_reason"]) == classify_provider(provider)
    assert summary["provider_reason"].startswith("auto: " if provider == "auto" else "--provider cpu")


def test_parquet_and_jsonl_hold_the_same_rows(clean, onnx_model, test_pngs, tmp_path):
    folder = test_pngs / "Coat"
    for fmt in ("jsonl", "parquet"):  # other stems: each run writes its own <stem>.confusion.png
        proc = run_cli("classify", folder, "-m", onnx_model, "-o", tmp_path / f"{fmt}.{fmt}", "--quiet")
        assert proc.returncode == 0, proc.stderr
    expected = {p: i for p, i in clean["labels"].items() if Path(p).parent.name == "Coat"}
    for fmt in ("jsonl", "parquet"):
        assert {r["path"]: r["index"] for r in read_rows(tmp_path / f"{fmt}.{fmt}")} == expected


@pytest.mark.parametrize(("args", "contains"), [
    (["nowhere/"], "no such file"),
    (["{pngs}", "-m", "missing.onnx"], "model file not found"),
    (["{pngs}", "-m", "bad.onnx"], "not an ONNX model"),
    pytest.param(["{pngs}", "--provider", "cuda"], "CUDAExecutionProvider",
                 marks=pytest.mark.skipif(CUDA, reason="onnxruntime has CUDA here: see test_provider_cuda_...")),
    (["{pngs}", "-o", "out.txt"], "cannot tell the format"),
    (["{pngs}", "{pngs}/Bag"], "inside"),
    (["{pngs}", "--resume"], "--resume needs an --output"),
])
def test_usage_errors_exit_2_with_one_line(args, contains, onnx_model, test_pngs, tmp_path):
    (tmp_path / "bad.onnx").write_text("not a model")
    args = [a.format(pngs=test_pngs) for a in args]
    if "-m" not in args:
        args += ["-m", str(onnx_model)]
    proc = run_cli("classify", *args, cwd=tmp_path)
    assert_one_line_error(proc, 2, contains)


@pytest.mark.skipif(not CUDA, reason="onnxruntime has no CUDAExecutionProvider here")
def test_provider_cuda_classifies_as_the_cpu_does(clean, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "cuda.csv"
    proc = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", out, "--provider", "cuda", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "provider: cuda" in proc.stderr and json.loads(proc.stdout)["provider"] == "cuda"
    rows = list(read_rows(out))
    cpu = {r["path"]: r for r in clean["rows"]}
    assert len(rows) == 1000 and all(r["error"] is None for r in rows)
    assert sum(r["index"] != cpu[r["path"]]["index"] for r in rows) <= 1  # fp32 on both: a near-tie at most
    assert max(abs(r["score"] - cpu[r["path"]]["score"]) for r in rows) < 1e-3


def test_help_states_the_exit_codes_that_runs_give(onnx_model, test_pngs, tmp_path):
    """Each exit code in --help is the one a run in that situation gives, and no run gives one it leaves out."""
    text = " ".join(run_cli("classify", "--help", check=True).stdout.split())
    stated = {int(code): meaning for code, meaning in re.findall(r"(\d+) ([a-z][^,]*)", text.split("Exit codes:")[1])}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "fine.png").write_bytes(next((test_pngs / "Bag").glob("*.png")).read_bytes())
    (broken / "bad.png").write_bytes(b"not an image")
    ok = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", tmp_path / "ok.csv", "-q").returncode
    failed = run_cli("classify", broken, "-m", onnx_model, "-o", tmp_path / "failed.csv", "-q").returncode
    usage = run_cli("classify", tmp_path / "nowhere", "-m", onnx_model).returncode
    with open("/dev/full", "w") as full:  # a full disk, where the table goes
        unwritten = subprocess.run([sys.executable, "-m", "fmnist_onnx", "classify", str(test_pngs / "Bag"), "-m",
                                    str(onnx_model)], stdout=full, stderr=subprocess.DEVNULL).returncode
    from test_runtime import alloc_model, black_then_garments, limit_memory

    model_failed = run_cli("classify", black_then_garments(tmp_path / "mixed", test_pngs), "-m",
                           alloc_model(tmp_path / "alloc.onnx"), "-o", tmp_path / "oom.csv", "--workers", "1",
                           "--provider", "cpu", "-q", preexec_fn=limit_memory).returncode
    with _start_classify(test_pngs / "Bag", onnx_model, tmp_path / "cut.csv", workers=1, chunks=1) as held:
        os.killpg(held.proc.pid, signal.SIGINT)
        interrupted = held.proc.wait(120)
    with _start_classify(test_pngs / "Bag", onnx_model, tmp_path / "term.csv", workers=1, chunks=1) as held:
        held.proc.terminate()
        terminated = held.proc.wait(120)
    got = {ok, failed, usage, unwritten, model_failed, interrupted, terminated}
    assert sorted(stated) == sorted(got), (stated, ok, failed, usage, unwritten, interrupted, terminated)
    assert "every file classified" in stated[ok] and "some files failed" in stated[failed]
    assert "usage" in stated[usage] and "could not be written" in stated[unwritten]
    assert "out of memory" in stated[model_failed]
    assert "interrupted" in stated[interrupted] and "SIGTERM" in stated[terminated]


def test_ctrl_c_keeps_the_journal_and_says_how_to_resume(clean, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.jsonl"
    with _start_classify(test_pngs, onnx_model, out, workers=1, chunks=1) as held:
        written = _journal_rows(journal_path(out))
        os.killpg(held.proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, workers included
        _, stderr = held.proc.communicate(timeout=120)
    assert held.proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert _journal_rows(journal_path(out)) == written  # the rows written before Ctrl-C, and no more
    assert journal_path(out).exists() and not out.exists()
    resumed = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert {r["path"]: r["index"] for r in read_rows(out)} == clean["labels"]


def test_same_folder_twice_is_refused(onnx_model, test_pngs):
    proc = run_cli("classify", test_pngs / "Bag", str(test_pngs / "Bag") + "/", "-m", onnx_model)
    assert_one_line_error(proc, 2, "same")


def test_sigterm_keeps_the_journal_and_exits_143(test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    with _start_classify(test_pngs, onnx_model, out, workers=2, chunks=1) as held:
        written = _journal_rows(journal_path(out))
        held.proc.terminate()  # the parent alone, as a service manager or `kill PID` does
        _, stderr = held.proc.communicate(timeout=120)
    assert held.proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert _journal_rows(journal_path(out)) == written and not out.exists()


def test_the_inference_process_killed_midway_is_one_line_then_resume(clean, test_pngs, onnx_model, tmp_path):
    """The batched path's inference process dies (the OOM killer, a crash in onnxruntime): one line, the journal
    keeps the rows so far, --resume finishes with every file exactly once."""
    out = tmp_path / "preds.csv"
    args = ("--inference", "batched", "--provider", "cpu")
    with _start_classify(test_pngs, onnx_model, out, 2, 2, *args) as held:
        stage = _children(held.proc.pid)[-1]  # forked after the decoding workers
        os.kill(stage, signal.SIGKILL)
        assert wait_for_exit([stage]) == []
        held.release()
        _, stderr = held.proc.communicate(timeout=300)
    assert held.proc.returncode == 2 and "Traceback" not in stderr, stderr
    assert "an inference process died" in stderr and "--resume" in stderr
    assert 0 < _journal_rows(journal_path(out)) < 10000
    proc = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--resume", *args)
    assert proc.returncode == 0, proc.stderr
    rows = list(read_rows(out))
    assert len(rows) == 10000 and {r["path"]: r["index"] for r in rows} == clean["labels"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
@pytest.mark.parametrize("inference", ["workers", "batched"])
def test_workers_die_with_a_parent_killed_alone(inference, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    with _start_classify(test_pngs, onnx_model, out, 2, 1, "--provider", "cpu", "--inference", inference) as held:
        workers = _children(held.proc.pid)  # and the inference process, batched
        held.proc.kill()  # the parent only, as the OOM killer would
        held.proc.wait()
        left = wait_for_exit(workers, timeout=30)
        for w in left:
            os.kill(w, signal.SIGKILL)
    assert len(workers) == 2 + (inference == "batched") and not left, "worker processes outlived their parent"


@pytest.mark.parametrize("odd", [None, "a,b.png", "bad"])
def test_csv_top1_from_arrays_equals_the_row_by_row_encoding(odd, onnx_model, test_pngs):
    """make_rows' fast path (CSV, top-1, no Row per file) writes the bytes table.encode writes; a chunk with a
    path to quote or a failed file goes the row-by-row way, with the same result."""
    from fmnist_onnx import images
    from fmnist_onnx.classify import make_rows, predict_rows
    from fmnist_onnx.runtime import open_session
    from fmnist_onnx.table import encode

    paths = sorted(str(p) for p in Path(test_pngs).rglob("*.png"))[:300]
    imgs, errors = images.preprocess_batch(paths)
    if odd == "bad":
        errors[7] = "not an image"
    elif odd:
        paths[7] = str(Path(paths[7]).with_name(odd))
    session = open_session(onnx_model, "cpu")
    fast = make_rows(session, paths, imgs, errors, 1, 128, "csv")
    slow = predict_rows(session, paths, imgs, errors, 1, 128)
    for r in slow:  # the true class of the ImageFolder layout, as the row-by-row way knows it
        r.truth = images.true_class(r.path)
    assert fast.data == encode(slow, "csv", 1)
    assert fast.indices.tolist() == [r.indices[0] if not r.error else -1 for r in slow]
    assert fast.errors == [r.error for r in slow] and (fast.truth >= 0).all()
