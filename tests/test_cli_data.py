"""`fmnist-onnx data export-png`: the ImageFolder layout, the pixels of the dataset, no clobbering."""

from __future__ import annotations

import gzip

import numpy as np
from PIL import Image

from fmnist_onnx.data import DEBIAN_DIR
from fmnist_onnx.spec import CLASSES, class_folder_name
from harness import assert_one_line_error, run_cli


def idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(DEBIAN_DIR / f"{name}.gz").read(), np.uint8, offset=offset)


def test_export_png_writes_the_split_by_class(tmp_path):
    out = tmp_path / "train"
    proc = run_cli("data", "export-png", "--split", "train", "--out", out, "--limit", "40")
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
    proc = run_cli("data", "export-png", "--out", tmp_path, "--limit", "3")
    assert_one_line_error(proc, 2, "not empty")
    proc = run_cli("data", "export-png", "--out", tmp_path, "--limit", "3", "--overwrite", check=True)
    assert len(list(tmp_path.rglob("*.png"))) == 3 and (tmp_path / "mine.txt").read_text() == "keep"
