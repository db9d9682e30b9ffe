"""`fmnist-onnx classify` as users run it: real PNG folders, real processes, real kills."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from fmnist_onnx.sinks import journal_path, read_rows


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


def test_rows_are_in_walk_order_with_scores(clean):
    paths = [r["path"] for r in clean["rows"]]
    assert paths == sorted(paths, key=lambda p: (Path(p).parent.name, Path(p).name))
    assert all(0.1 <= r["score"] <= 1 and r["error"] is None for r in clean["rows"])


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
    errors = [*broken, "broken/dangling.png", "broken/pipe.png"]
    if os.geteuid() != 0:  # root reads any file: this case is only real for other users
        (root / "broken" / "secret.png").write_bytes(good)
        (root / "broken" / "secret.png").chmod(0)
        errors.append("broken/secret.png")
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
    assert "classified" in proc.stdout and f"{len(odd_folder['errors'])} failed" in proc.stdout
    assert f"{odd_folder['skipped']} other files skipped" in proc.stdout


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


def _start_classify(test_pngs: Path, model: Path, out: Path, workers: int, rows: int) -> subprocess.Popen:
    """A real `classify` in its own process group, returned once its journal holds ``rows`` rows."""
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(test_pngs), "-m", str(model), "-o", str(out),
           "--workers", str(workers)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while _journal_rows(journal_path(out)) < rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return proc


def test_sigkill_then_resume_gives_every_file_exactly_once(clean, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    proc = _start_classify(test_pngs, onnx_model, out, workers=1, rows=100)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, with no chance to clean up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the run finished before the kill: nothing was tested"
    done = _journal_rows(journal_path(out))
    assert 100 <= done < 10000

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


def test_a_worker_killed_midway_loses_nothing(clean, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    proc = _start_classify(test_pngs, onnx_model, out, workers=2, rows=100)
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)  # as the OOM killer would
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "a worker process died" in stderr, "the run finished before the kill: nothing was tested"
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
                                                  "label_3", "score_3", "error"]
    assert "provider: cpu (auto)" in proc.stderr and "1000 of 1000 files classified" in proc.stderr


def test_parquet_and_jsonl_hold_the_same_rows(clean, onnx_model, test_pngs, tmp_path):
    folder = test_pngs / "Coat"
    for fmt in ("jsonl", "parquet"):
        proc = run_cli("classify", folder, "-m", onnx_model, "-o", tmp_path / f"p.{fmt}", "--quiet")
        assert proc.returncode == 0, proc.stderr
    expected = {p: i for p, i in clean["labels"].items() if Path(p).parent.name == "Coat"}
    for fmt in ("jsonl", "parquet"):
        assert {r["path"]: r["index"] for r in read_rows(tmp_path / f"p.{fmt}")} == expected


@pytest.mark.parametrize(("args", "contains"), [
    (["nowhere/"], "no such file"),
    (["{pngs}", "-m", "missing.onnx"], "model file not found"),
    (["{pngs}", "-m", "bad.onnx"], "not a loadable ONNX model"),
    (["{pngs}", "--provider", "cuda"], "CUDAExecutionProvider"),
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


def test_help_states_the_exit_codes():
    proc = run_cli("classify", "--help")
    assert proc.returncode == 0
    assert "3 some files failed" in proc.stdout and "Examples:" in proc.stdout


def test_ctrl_c_keeps_the_journal_and_says_how_to_resume(clean, test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.jsonl"
    proc = _start_classify(test_pngs, onnx_model, out, workers=1, rows=50)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, workers included
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert journal_path(out).exists() and not out.exists()
    resumed = run_cli("classify", test_pngs, "-m", onnx_model, "-o", out, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert {r["path"]: r["index"] for r in read_rows(out)} == clean["labels"]


def test_same_folder_twice_is_refused(onnx_model, test_pngs):
    proc = run_cli("classify", test_pngs / "Bag", str(test_pngs / "Bag") + "/", "-m", onnx_model)
    assert_one_line_error(proc, 2, "same")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_workers_die_with_a_parent_killed_alone(test_pngs, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    proc = _start_classify(test_pngs, onnx_model, out, workers=2, rows=1)
    workers = _children(proc.pid)
    proc.kill()  # the parent only, as the OOM killer would
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert workers and not left, "worker processes outlived their parent"
