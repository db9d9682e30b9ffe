"""classify's own files and state (issue 17): one run per output (a lock), a journal, run record and outputs
that are never written or read through a planted link, --resume that checks every row against the walk, a
finished output that keeps its run record, a walk that leaves the run's own files out and goes any depth,
and names shown with their control characters escaped."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_onnx.classify import RunIdentity, confusion_png_path, identity_path, record_path
from fmnist_onnx.files import OutputLock, lock_path
from fmnist_onnx.journal import journal_path
from fmnist_onnx.table import read_rows
from fmnist_onnx.testing import CLASSIFY_AFTER_CHUNK, CLASSIFY_ENGINE_READY
from harness import Held, assert_one_line_error, run_cli

N = 20


@pytest.fixture(scope="module")
def small(test_pngs, tmp_path_factory) -> Path:
    """``N`` test PNGs in an ImageFolder layout (in/Bag/)."""
    folder = tmp_path_factory.mktemp("small") / "in"
    (folder / "Bag").mkdir(parents=True)
    for src in sorted((test_pngs / "Bag").glob("*.png"))[:N]:
        shutil.copy(src, folder / "Bag" / src.name)
    return folder


def _classify(folder, model, out, *args, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("classify", folder, "-m", model, "-o", out, "--workers", "1", "-q", *args, **kwargs)


def tree(folder: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``folder``, not following links: {relative path: (kind, sha256 or link target)}."""
    out = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("dir", "")
    return out


def _journal(out: Path, small: Path, model: Path, lines: list[str], fmt: str = "csv") -> bytes:
    """An interrupted run's journal of ``lines`` (CSV rows after the header, or JSONL rows) and its record."""
    head = "path,label,index,score,error,true_label\n" if fmt == "csv" else ""
    data = (head + "".join(line + "\n" for line in lines)).encode()
    journal_path(out).write_bytes(data)
    identity_path(out).write_text(RunIdentity.of(model, "auto", 1, True, [str(small)]).to_json())
    return data


def _files(small: Path) -> list[str]:
    return sorted(str(p) for p in (small / "Bag").glob("*.png"))


# ---------------------------------------------------------------------------------------------- one run per output

def test_a_second_run_on_a_held_output_is_refused_naming_the_first_and_a_kill_frees_it(small, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(small), "-m", str(onnx_model), "-o", str(out),
           "--workers", "1", "-q"]
    with Held(cmd, f"{CLASSIFY_ENGINE_READY}:1", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL) as held:
        pid = held.wait()
        for args in ([], ["--overwrite"], ["--resume"]):
            assert_one_line_error(_classify(small, onnx_model, out, *args), 2, f"process {pid}")
        ray = run_cli("classify", small, "-m", onnx_model, "-o", out, "--engine", "ray", "--overwrite")
        assert_one_line_error(ray, 2, f"process {pid}")  # refused before Ray is imported
        assert not out.exists()
        os.killpg(pid, signal.SIGKILL)  # the OS releases its lock: nothing to clean up by hand
        held.proc.wait()
    third = _classify(small, onnx_model, out, "--overwrite")
    assert third.returncode == 0, third.stderr
    assert len(list(read_rows(out))) == N and not lock_path(out).exists()


@pytest.mark.parametrize("then", ["it finishes", "Ctrl-C"])
def test_a_lock_removed_under_a_run_stops_it_before_its_journal_is_renamed_or_named(then, small, onnx_model,
                                                                                    tmp_path):
    """The lock file deleted while the run holds it, and a second run (this test) locking the name anew: the
    first one says so in one line, exit 2, its journal neither renamed nor removed, the second's lock kept."""
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(small), "-m", str(onnx_model), "-o", str(out),
           "--workers", "1", "-q"]
    with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:1", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.PIPE, text=True) as held:
        held.wait()
        lock_path(out).unlink()
        with OutputLock(out):
            if then == "Ctrl-C":
                os.killpg(held.proc.pid, signal.SIGINT)
            held.release()
            _, stderr = held.proc.communicate(timeout=120)
            assert lock_path(out).read_text() == f"{os.getpid()}\n"  # ours, left in place
    assert held.proc.returncode == 2, stderr
    assert stderr.count("\n") == 1 and f"Error: {lock_path(out)} was removed or replaced during this run" in stderr
    assert journal_path(out).exists() and not out.exists() and "--resume" not in stderr


def test_the_report_is_the_last_file_written_under_the_output_s_and_the_page_s_locks(small, onnx_model, tmp_path):
    """on_summary (where the CLI writes the --report page) runs with the output, its record and the confusion PNG in
    place, the journal gone, both locks still held; the files there are the ones RunFiles names, and the locks
    are gone once the run ends."""
    from fmnist_onnx.classify import RunFiles, classify
    from fmnist_onnx.errors import UserError

    out, page = tmp_path / "preds.csv", tmp_path / "r.html"
    there: list[str] = []

    def on_summary(summary) -> None:
        for name in (out, page):
            with pytest.raises(UserError, match="is being written by another run"):
                OutputLock(name).acquire()
        there.extend(sorted(os.listdir(tmp_path)))

    classify([small], onnx_model, out, report=page, on_summary=on_summary, workers=1)
    assert there == sorted([out.name, record_path(out).name, confusion_png_path(out).name, lock_path(out).name,
                            lock_path(page).name])
    assert {str(tmp_path / name) for name in there} <= set(RunFiles.of(out, page).all())
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, record_path(out).name, confusion_png_path(out).name])


# ---------------------------------------------------------------------------------------------- links

@pytest.fixture
def victim(tmp_path) -> Path:
    """Files a link planted beside the output points to: nothing of them may change."""
    v = tmp_path / "victim"
    v.mkdir()
    (v / "notes.txt").write_text("path,label,index,score,error\n")  # even one that reads as a journal
    (v / "profile").write_text("export PATH=/usr/bin\n")
    return v


@pytest.mark.parametrize("link", ["journal", "record"])
def test_resume_refuses_a_link_at_its_own_state_and_touches_nothing(link, small, onnx_model, tmp_path, victim):
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    _journal(out, small, onnx_model, [])
    own = journal_path(out) if link == "journal" else identity_path(out)
    shutil.copy(own, victim / "copy")
    own.unlink()
    own.symlink_to(victim / "copy")
    before, mine = tree(victim), tree(out.parent)
    proc = _classify(small, onnx_model, out, "--resume")
    assert_one_line_error(proc, 2, "symbolic link")
    assert tree(victim) == before and tree(out.parent) == mine


def test_overwrite_removes_links_at_every_file_of_the_run_never_their_targets(small, onnx_model, tmp_path, victim):
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    for own in (out, journal_path(out), identity_path(out), record_path(out), confusion_png_path(out)):
        own.symlink_to(victim / "notes.txt")
    before = tree(victim)
    proc = _classify(small, onnx_model, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert tree(victim) == before
    assert not any(p.is_symlink() for p in out.parent.iterdir())
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, record_path(out).name, confusion_png_path(out).name])
    assert len(list(read_rows(out))) == N


def test_a_link_at_the_lock_is_refused(small, onnx_model, tmp_path, victim):
    out = tmp_path / "preds.csv"
    lock_path(out).symlink_to(victim / "profile")
    before = tree(victim)
    assert_one_line_error(_classify(small, onnx_model, out), 2, "symbolic link")
    assert tree(victim) == before and not out.exists()


# ---------------------------------------------------------------------------------------------- --resume checks rows

def _row(path: str, index: int = 8) -> str:
    from fmnist_onnx.spec import CLASSES

    return f"{path},{CLASSES[index]},{index},0.5,,Bag"


@pytest.mark.parametrize(("case", "line"), [("foreign path", 3), ("twice", 4), ("index 99", 3), ("index eight", 3)])
def test_resume_refuses_a_row_it_would_not_write_naming_its_line(case, line, small, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    first, second = _files(small)[:2]
    bad = {"foreign path": _row(str(tmp_path / "elsewhere.png")), "twice": _row(first),
           "index 99": _row(second).replace(",8,", ",99,"), "index eight": _row(second).replace(",8,", ",eight,")}
    lines = [_row(first), bad[case]] if case != "twice" else [_row(first), _row(second), bad[case]]
    data = _journal(out, small, onnx_model, lines)
    proc = _classify(small, onnx_model, out, "--resume")
    assert_one_line_error(proc, 2, f"line {line} ")
    assert journal_path(out).read_bytes() == data and not out.exists()


def test_a_parquet_journal_with_a_wrong_row_is_refused_at_resume_not_at_conversion(small, onnx_model, tmp_path):
    out = tmp_path / "preds.parquet"
    first = _files(small)[0]
    row = {"path": first, "label": "Bag", "index": "8", "score": 0.5, "error": None, "true_label": "Bag"}
    data = _journal(out, small, onnx_model, [json.dumps(row)], fmt="jsonl")
    proc = _classify(small, onnx_model, out, "--resume")
    assert_one_line_error(proc, 2, "line 1 has index '8'")
    assert journal_path(out).read_bytes() == data


def test_a_torn_last_line_is_cut_and_the_run_finishes(small, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    _journal(out, small, onnx_model, [_row(p) for p in _files(small)[:5]])
    with open(journal_path(out), "ab") as f:
        f.write(_row(_files(small)[5])[:12].encode())  # no newline: the power went mid-write
    proc = _classify(small, onnx_model, out, "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed"] == 5
    assert sorted(r["path"] for r in read_rows(out)) == _files(small)


@pytest.mark.parametrize("record", ['{"inputs": [1, 2]}', "[" * 30000 + "]" * 30000, "{}", "\udcff"])
def test_a_run_record_of_the_wrong_shape_is_one_line(record, small, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    right = json.loads(RunIdentity.of(onnx_model, "auto", 1, True, [str(small)]).to_json())
    data = _journal(out, small, onnx_model, [_row(_files(small)[0])])
    text = json.dumps({**right, **json.loads(record)}) if record.startswith("{\"") else record
    identity_path(out).write_bytes(text.encode("utf-8", "surrogateescape"))
    assert_one_line_error(_classify(small, onnx_model, out, "--resume"), 2, "unreadable")
    assert journal_path(out).read_bytes() == data


@pytest.mark.parametrize(("version", "said"), [(None, "an earlier version"), (3, "a later version")])
def test_a_journal_of_another_version_of_the_row_names_is_one_line(version, said, small, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    data = _journal(out, small, onnx_model, [_row(_files(small)[0])])
    record = json.loads(identity_path(out).read_text())
    assert record.pop("version") == 2  # before version 2, a record had none
    identity_path(out).write_text(json.dumps(record if version is None else {**record, "version": version}))
    assert_one_line_error(_classify(small, onnx_model, out, "--resume"), 2, said)
    assert journal_path(out).read_bytes() == data


# ---------------------------------------------------------------------------------------------- a finished output

def test_resume_of_a_finished_output_is_checked_against_its_record(small, onnx_model, tmp_path):
    out = tmp_path / "preds.csv"
    assert _classify(small, onnx_model, out).returncode == 0
    assert record_path(out).exists() and not identity_path(out).exists()
    other = tmp_path / "other"
    shutil.copytree(small, other)
    assert_one_line_error(_classify(other, onnx_model, out, "--resume"), 2, "was written by another run")
    assert_one_line_error(_classify(small, onnx_model, out, "--resume", "--top-k", "2"), 2, "--top-k")
    same = _classify(small, onnx_model, out, "--resume", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["already_complete"]
    shutil.copy(_files(small)[0], small / "Bag" / "added since.png")
    try:
        assert_one_line_error(_classify(small, onnx_model, out, "--resume"), 2, "1 files of the inputs have no row")
    finally:
        (small / "Bag" / "added since.png").unlink()
    record_path(out).unlink()
    assert_one_line_error(_classify(small, onnx_model, out, "--resume"), 2, "no record of the run")


# ---------------------------------------------------------------------------------------------- the walk

def test_the_run_never_reads_its_own_files_in_an_input_folder(small, onnx_model, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(small, folder)
    out = folder / "Bag" / "preds.csv"
    for _ in range(2):  # the second run finds the first's output, record, confusion PNG and report
        proc = _classify(folder, onnx_model, out, "--overwrite", "--json", "--report", folder / "Bag" / "r.html")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["files"] == N and summary["skipped"] == 0, summary
    assert confusion_png_path(out).exists() and (folder / "Bag" / "r.html").exists()


# (what names the image, its name in in/Bag/, the arguments after the folder and the model: {img} is its path)
WALKED_AS_OUTPUT = [
    ("--report", "photo.jpg", ["-o", "{tmp}/r.csv", "--report", "{img}"]),
    ("--report", "photo.png", ["-o", "{tmp}/r.csv", "--report", "{img}"]),
    ("--output", "photo.jpg", ["-o", "{img}", "--format", "csv"]),
    ("the confusion matrix", "preds.confusion.png", ["-o", "{tmp}/in/Bag/preds.csv"]),
]


@pytest.mark.parametrize(("what", "name", "args"), WALKED_AS_OUTPUT, ids=[f"{w} {n}" for w, n, _ in WALKED_AS_OUTPUT])
def test_an_image_the_walk_reads_is_an_input_even_with_overwrite(small, onnx_model, tmp_path, what, name, args):
    from PIL import Image

    folder = tmp_path / "in"
    shutil.copytree(small, folder)
    img = folder / "Bag" / name
    Image.open(_files(small)[0]).save(img, "JPEG" if name.endswith(".jpg") else "PNG")  # a real image, theirs
    before = tree(folder)
    proc = run_cli("classify", folder, "-m", onnx_model, "--workers", "1", "-q", "--overwrite",
                   *[a.format(tmp=tmp_path, img=img) for a in args])
    assert_one_line_error(proc, 2, f"{what} {img} is an image in the input folder {folder}")
    assert tree(folder) == before  # the image as it was, and nothing else written there


def test_a_rerun_knows_its_confusion_png_in_an_input_folder_by_the_run_record(small, onnx_model, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(small, folder)
    out = folder / "preds.csv"
    for _ in range(2):  # the second run finds the first's confusion PNG, an image in the folder it reads
        proc = _classify(folder, onnx_model, out, "--overwrite", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["files"] == N
    record = json.loads(record_path(out).read_text())
    assert record["writes"] == [str(confusion_png_path(out))]
    png = confusion_png_path(out).read_bytes()
    for forged in ([], ["in/preds.confusion.png"], [str(confusion_png_path(out)), 1]):  # none, relative, bad
        record_path(out).write_text(json.dumps({**record, "writes": forged}))
        proc = _classify(folder, onnx_model, out, "--overwrite")
        assert_one_line_error(proc, 2, "the confusion matrix")
    record_path(out).unlink()
    assert_one_line_error(_classify(folder, onnx_model, out, "--overwrite"), 2, "an image in the input folder")
    assert confusion_png_path(out).read_bytes() == png


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(small, onnx_model, tmp_path):
    image = tmp_path / "a.png"
    shutil.copy(_files(small)[0], image)
    before = image.read_bytes()
    proc = run_cli("classify", image, "-m", onnx_model, "-o", tmp_path / "a.csv", "--overwrite", "--report", image)
    assert_one_line_error(proc, 2)
    proc = run_cli("classify", image, "-m", onnx_model, "-o", onnx_model, "--format", "csv", "--overwrite")
    assert_one_line_error(proc, 2, "also one of its inputs")
    assert image.read_bytes() == before


@pytest.fixture
def deep(tmp_path):
    """``tmp_path/d/d/.../d`` (1,100 levels), made and removed by a loop: shutil.rmtree (pytest's clean-up of
    old temporary folders) recurses once a level and would fail on it."""
    yield tmp_path / "d"
    d = tmp_path / "d"
    while os.path.lexists(d):  # peel the chain from the top: each step is a few levels deep
        for entry in os.listdir(d):
            if entry != "d":
                os.unlink(d / entry)
        if os.path.lexists(d / "d"):
            os.rename(d / "d", tmp_path / "next")
            os.rmdir(d)
            os.rename(tmp_path / "next", d)
        else:
            os.rmdir(d)


def test_folders_nested_1100_deep_are_walked(small, onnx_model, tmp_path, deep):
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(1100):  # by descriptor: no path longer than the file system takes
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    with open(os.open("x.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
        f.write(Path(_files(small)[0]).read_bytes())
    os.close(fd)
    proc = _classify(deep, onnx_model, tmp_path / "deep.csv")
    assert proc.returncode == 0, proc.stderr
    assert [r["path"].count("/d") for r in read_rows(tmp_path / "deep.csv")] == [1100]


def test_names_reach_the_terminal_with_their_control_characters_escaped(onnx_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "\x1b]0;owned\x07cat_\u202egnp.png").write_bytes(b"not an image")
    proc = _classify(folder, onnx_model, tmp_path / "p.csv")
    assert proc.returncode == 3, proc.stderr
    for text in (proc.stdout, proc.stderr):
        assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "\\x1b]0;owned\\x07cat_\\u202egnp.png" in proc.stderr
