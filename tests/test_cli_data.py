"""`fmnist-onnx data export-png`: the ImageFolder layout, the pixels of the dataset, no clobbering."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile

import numpy as np
import pytest
from PIL import Image

from fmnist_onnx.data import DEBIAN_DIR
from fmnist_onnx.spec import CLASSES, class_folder_name
from harness import assert_one_line_error, cli_run, run_cli

# What the command writes and refuses is checked in this process (cli_run); what needs a process of its own (a
# current folder, a full disk's exit 4 and clean-up) runs it as one (run_cli).


def idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(DEBIAN_DIR / f"{name}.gz").read(), np.uint8, offset=offset)


def test_export_png_writes_the_split_by_class(tmp_path):
    out = tmp_path / "train"
    proc = cli_run("data", "export-png", "--split", "train", "--out", out, "--limit", "40")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 40 PNG files" in proc.stdout
    pixels = idx("train-images-idx3-ubyte", 16).reshape(-1, 28, 28)
    labels = idx("train-labels-idx1-ubyte", 8)
    files = sorted(out.rglob("*.png"))
    assert len(files) == 40
    for f in files:
        i = int(f.stem)
        assert f.parent.name == class_folder_name(CLASSES[labels[i]])
        np.testing.assert_array_equal(np.asarray(Image.open(f)), pixels[i])
    assert (out / "T-shirt-top").is_dir() and not list(out.rglob(".*"))  # no temporary files left


def test_export_png_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    proc = cli_run("data", "export-png", "--out", tmp_path, "--limit", "3")
    assert_one_line_error(proc, 2, "not empty")
    proc = cli_run("data", "export-png", "--out", tmp_path, "--limit", "3", "--overwrite", check=True)
    assert len(list(tmp_path.rglob("*.png"))) == 3 and (tmp_path / "mine.txt").read_text() == "keep"


def test_export_png_format_tar_writes_shards_of_the_split(tmp_path):
    proc = cli_run("data", "export-png", "--format", "tar", "--shard-size", "10", "--limit", "25", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 tar shards, 25 images" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test-000000.tar", "test-000001.tar", "test-000002.tar",
                                                         "test.manifest.json"]
    labels = idx("t10k-labels-idx1-ubyte", 8)
    with tarfile.open(tmp_path / "test-000002.tar") as tar:
        assert tar.getnames() == [f"{i:05d}.{ext}" for i in range(20, 25) for ext in ("png", "cls")]
        assert tar.extractfile("00024.cls").read() == str(labels[24]).encode()


def test_export_png_format_parquet_writes_the_hugging_face_file(tmp_path):
    import pyarrow.parquet as pq

    proc = cli_run("data", "export-png", "--split", "train", "--format", "parquet", "--limit", "30", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(tmp_path / "train-00000-of-00001.parquet")
    assert table.column("label").to_pylist() == idx("train-labels-idx1-ubyte", 8)[:30].tolist()
    png = table.column("image")[7].as_py()["bytes"]
    pixels = idx("train-images-idx3-ubyte", 16).reshape(-1, 28, 28)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels[7])


def test_export_png_format_tar_refuses_existing_shards(tmp_path):
    cli_run("data", "export-png", "--format", "tar", "--limit", "3", "--out", tmp_path, check=True)
    proc = cli_run("data", "export-png", "--format", "tar", "--limit", "3", "--out", tmp_path)
    assert_one_line_error(proc, 2, "test-000000.tar exists; use --overwrite")
    cli_run("data", "export-png", "--format", "tar", "--limit", "3", "--out", tmp_path, "--overwrite", check=True)


def test_export_png_shard_size_needs_format_tar(tmp_path):
    proc = cli_run("data", "export-png", "--shard-size", "10", "--out", tmp_path / "out")
    assert_one_line_error(proc, 2, "--shard-size applies to --format tar only")
    assert not (tmp_path / "out").exists()


def test_export_png_format_tar_overwrite_removes_only_what_an_export_wrote(tmp_path):
    cli_run("data", "export-png", "--format", "tar", "--shard-size", "10", "--limit", "30", "--out", tmp_path,
            check=True)
    (tmp_path / "test-000005.tar").write_bytes(b"mine")
    os.mkfifo(tmp_path / "test-000006.tar")
    proc = cli_run("data", "export-png", "--format", "tar", "--limit", "10", "--out", tmp_path, "--overwrite",
                   check=True)
    assert "removed test-000001.tar" in proc.stderr and "removed test-000002.tar" in proc.stderr
    assert "kept test-000005.tar: no earlier export of this tool wrote it" in proc.stderr
    assert (tmp_path / "test-000005.tar").read_bytes() == b"mine"
    assert stat.S_ISFIFO((tmp_path / "test-000006.tar").lstat().st_mode)


def test_export_png_out_dot_writes_into_the_current_folder(tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    run_cli("data", "export-png", "--format", "parquet", "--limit", "5", "--out", ".", cwd=here, check=True)
    assert [p.name for p in here.iterdir()] == ["test-00000-of-00001.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # its lock, beside it, is gone


@pytest.mark.parametrize("fmt", ["png", "tar", "parquet"])
def test_export_png_out_root_is_refused(fmt):
    assert_one_line_error(cli_run("data", "export-png", "--format", fmt, "--out", "/"), 2, "--out /: the root folder")


@pytest.mark.parametrize("fmt", ["png", "tar", "parquet"])
def test_export_png_on_a_full_disk_says_one_line_exit_4_and_cleans_up(fmt, tmpfs):
    disk = tmpfs(size="1m")
    proc = run_cli("data", "export-png", "--format", fmt, "--limit", "5000", "--out", disk / "out", "-q")  # 2-15 MB
    assert_one_line_error(proc, 4, "No space left on device")
    assert len(proc.stderr.strip().splitlines()) == 1
    left = [p.name for p in (disk / "out").rglob("*") if p.is_file()]
    assert not [n for n in left if n.startswith(".")]  # no temporary file
    if fmt != "png":  # png: the files written before are whole, and kept (the message says so)
        assert left == []
    assert not (disk / "out.lock").exists()
