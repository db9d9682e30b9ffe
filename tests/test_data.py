"""Finding Fashion-MNIST without a network."""

from __future__ import annotations

import gzip
import shutil

import pytest

from fmnist_onnx import data
from fmnist_onnx.errors import UserError
from harness import assert_one_line_error, run_cli


def test_debian_package_is_found():
    split = data.load_split(train=False)
    assert tuple(split.images.shape) == (10000, 28, 28)
    assert split.labels[:3].tolist() == [9, 2, 1]  # the first test images: ankle boot, pullover, trouser


def test_as_float_is_what_totensor_gives():
    from torchvision.transforms import ToTensor

    split = data.load_split(train=False)
    ds = data.load_dataset(train=False, transform=ToTensor())
    x0, _ = ds[0]
    assert (split.as_float()[0] == x0).all()


def test_folder_of_unzipped_idx_files(tmp_path):
    for name in data.IDX_FILES:
        with gzip.open(data.DEBIAN_DIR / f"{name}.gz", "rb") as f, open(tmp_path / name, "wb") as out:
            shutil.copyfileobj(f, out)
    assert len(data.load_split(train=False, data_dir=tmp_path).labels) == 10000


def test_env_var_is_used(tmp_path, monkeypatch):
    for name in data.IDX_FILES:
        shutil.copy(data.DEBIAN_DIR / f"{name}.gz", tmp_path)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert data.find_root() != data.find_root(data.DEBIAN_DIR)  # prepared from the env folder, not Debian's


def test_missing_data_names_where_it_looked(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist") as e:
        data.find_root(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_data_cli_exit_code(tmp_path):
    proc = run_cli("train", "--data-dir", tmp_path, "--out-dir", tmp_path / "out", "-q")
    assert_one_line_error(proc, 2, "Fashion-MNIST not found")


def test_truncated_file_is_a_clear_error(tmp_path):
    for name in data.IDX_FILES:
        shutil.copy(data.DEBIAN_DIR / f"{name}.gz", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(UserError, match="t10k-images"):
        data.load_split(train=False, data_dir=tmp_path)
