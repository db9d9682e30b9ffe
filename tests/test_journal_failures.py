"""journal.py and stdout_sink.py where writing fails: a full disk (a small tmpfs), a read-only folder, stdout
on /dev/full, outputs that are not regular files, --format against the suffix. Real classify runs on the real test
PNGs: one line, no traceback, and nothing lost (after freeing space --resume finishes with every file exactly once)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_onnx.files import OUTPUT_FAILED, OutputError
from fmnist_onnx.journal import JournalSink, journal_path
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import JournalScan, Row, read_rows
from harness import assert_one_line_error, run_cli

# Names a CSV writer must quote (a CR too) and one that is not UTF-8: they sort before and after the digits,
# so each class folder has some in the rows written before the disk fills and some after.
ODD_NAMES = ["cr\rin name.png", "lf\nin name.png", 'comma, "quote".png', os.fsdecode(b"\xff not utf-8.png"),
             "backslash\\xff.png"]


# ---------------------------------------------------------------------------------------------- fixtures

def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def odd_pngs(test_pngs, tmp_path_factory) -> tuple[Path, list[str]]:
    """2,000 real test PNGs (200 a class, ImageFolder layout), ODD_NAMES among them in every class; and the
    paths classify's walk makes of them."""
    root = tmp_path_factory.mktemp("odd_pngs") / "in"
    for cls in sorted(os.listdir(test_pngs)):
        (root / cls).mkdir(parents=True)
        files = sorted(os.listdir(test_pngs / cls))[:200]
        for name, src in zip([*ODD_NAMES, *files[len(ODD_NAMES):]], files, strict=True):
            shutil.copyfile(test_pngs / cls / src, root / cls / name)
    paths = sorted(os.path.join(root, cls, name) for cls in os.listdir(root) for name in os.listdir(root / cls))
    return root, paths


def rows(n: int, offset: int = 0) -> list[Row]:
    return [Row(f"{ODD_NAMES[i % len(ODD_NAMES)]}.{i}", [i % 10], [0.5]) for i in range(offset, offset + n)]


# ---------------------------------------------------------------------------------------------- the sink

@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_full_disk_mid_write_keeps_whole_chunks_and_resume_finishes(tmpfs, fmt):
    disk = tmpfs(size="64k")
    out = disk / f"p.{fmt}"
    sink = JournalSink.open(out, fmt, 1)
    written = 0
    with pytest.raises(OutputError) as failure:
        while True:  # chunks of 100 rows (about 4-6 KB) until the disk is full
            sink.write(rows(100, written))
            written += 100
    assert failure.value.exit_code == OUTPUT_FAILED == 4
    assert "No space left on device" in str(failure.value) and "--resume" in str(failure.value)
    sink.close()  # never raises, even with the disk full
    sink.close()
    scan = JournalScan(journal_path(out), fmt)
    assert [r["path"] for r in scan] == [r.path for r in rows(written)]  # whole chunks: no torn row
    assert 0 < written < 5000 and scan.good == journal_path(out).stat().st_size
    assert not out.exists()

    remount(disk, "size=1m")  # space freed
    seen = []
    sink = JournalSink.open(out, fmt, 1, resume=True, on_previous_row=seen.append)
    assert len(seen) == written
    sink.write(rows(5000 - written, written))
    sink.finish()
    assert [r["path"] for r in read_rows(out)] == [r.path for r in rows(5000)]


def test_parquet_that_cannot_be_written_leaves_the_journal(tmpfs):
    disk = tmpfs(size="256k")
    out = disk / "p.parquet"
    sink = JournalSink.open(out, "parquet", 1)
    sink.write(rows(600))
    journal = journal_path(out).read_bytes()
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # the disk fills up before Parquet is written
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OutputError, match="All its rows are in .*p.parquet.partial.*--resume") as failure:
        sink.finish()
    assert failure.value.exit_code == OUTPUT_FAILED
    sink.close()
    assert sorted(os.listdir(disk)) == ["filler", "p.parquet.partial"]  # no half Parquet file, under any name
    assert journal_path(out).read_bytes() == journal

    (disk / "filler").unlink()
    sink = JournalSink.open(out, "parquet", 1, resume=True)
    sink.finish()
    assert [r["path"] for r in read_rows(out)] == [r.path for r in rows(600)]


def test_a_read_only_folder_is_refused(tmpfs):
    disk = tmpfs()
    remount(disk, "ro")
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(Exception, match="read-only file system") as failure:
            JournalSink.open(disk / "p.csv", "csv", 1, **kwargs)
        assert failure.type is not OutputError and failure.value.exit_code == 2  # nothing was done yet


# ---------------------------------------------------------------------------------------------- classify

@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_classify_on_a_disk_that_fills_up_then_resume(tmpfs, odd_pngs, onnx_model, fmt):
    root, paths = odd_pngs
    disk = tmpfs(size="96k")  # holds a few hundred of the 2,000 rows
    out = disk / f"preds.{fmt}"
    args = ["classify", root, "-m", onnx_model, "-o", out, "--workers", "2", "--quiet"]
    proc = run_cli(*args)
    assert_one_line_error(proc, OUTPUT_FAILED, "No space left on device")
    assert "kept there: free some space and run the same command with --resume" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
    done = [r["path"] for r in JournalScan(journal_path(out), "csv" if fmt == "csv" else "jsonl")]
    assert 0 < len(done) < len(paths) and done == paths[:len(done)]  # mid-run, and the journal is whole

    remount(disk, "size=4m")  # space freed
    proc = run_cli(*args, "--resume", check=True)
    assert f"{len(done)} of them from the interrupted run" in proc.stderr  # the summary, with -o FILE
    got = list(read_rows(out))
    assert sorted(r["path"] for r in got) == paths  # every file exactly once, odd names included
    assert all(r["error"] is None and r["label"] in CLASSES for r in got)
    if fmt == "jsonl":
        assert len([json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]) == len(paths)
    if fmt == "csv":
        with open(out, newline="", encoding="utf-8") as f:
            assert len(list(csv.reader(f, strict=True))) == len(paths) + 1


def test_classify_into_a_read_only_folder_is_refused_before_any_work(tmpfs, test_pngs, onnx_model):
    disk = tmpfs()
    remount(disk, "ro")
    proc = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", disk / "preds.csv")
    assert_one_line_error(proc, 2, "read-only file system")
    assert "provider:" not in proc.stderr  # refused before the model was even opened


def test_classify_to_a_full_stdout_is_one_line(test_pngs, onnx_model):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", "classify", test_pngs / "Bag", "-m", onnx_model,
                               "--quiet"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert_one_line_error(proc, OUTPUT_FAILED, "cannot write to stdout: No space left on device")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no "Exception ignored" at exit either


@pytest.mark.parametrize("kind", ["fifo", "char device"])
def test_classify_never_replaces_a_device_or_fifo(tmp_path, test_pngs, onnx_model, kind):
    out = tmp_path / "preds.csv"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("mknod needs root (CAP_MKNOD)")
    proc = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", out, "--overwrite", "--quiet")
    assert_one_line_error(proc, 2, "only regular files")
    mode = os.lstat(out).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)


@pytest.mark.parametrize(("output", "contains"), [("o.csv", "is a .csv file but --format says jsonl"),
                                                  ("-", "-o - writes CSV only")])
def test_classify_refuses_format_against_the_output(tmp_path, test_pngs, onnx_model, output, contains):
    proc = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", output, "--format", "jsonl", cwd=tmp_path)
    assert_one_line_error(proc, 2, contains)
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_classify_honours_format_for_an_output_without_suffix(tmp_path, test_pngs, onnx_model):
    out = tmp_path / "preds"
    run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", out, "--format", "jsonl", "--quiet", check=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 1000 and lines == list(read_rows(out))
