"""fmnist_onnx.layouts: WebDataset tar shards and the Hugging Face Parquet file, read back by Python's tarfile,
pyarrow and the `datasets` library itself, against the real dataset's pixels and the png export's bytes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmnist_onnx import images, layouts
from fmnist_onnx.data import DEBIAN_DIR
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import OutputError
from fmnist_onnx.spec import CLASSES, class_folder_name


def idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(DEBIAN_DIR / f"{name}.gz").read(), np.uint8, offset=offset)


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    """The first 25 test images, uint8 [25, 28, 28], and their labels, straight from the idx files (no torch)."""
    pixels = idx("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28)[:25].copy()
    return pixels, idx("t10k-labels-idx1-ubyte", 8)[:25].copy()


def members(shard) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def read_tar(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# ---------------------------------------------------------------------------------------------- tar

def test_layouts_tar_holds_the_png_exports_bytes_and_labels(split, tmp_path):
    pixels, labels = split
    images.export_png(pixels, labels, tmp_path / "png")
    w = layouts.export_tar(pixels, labels, tmp_path / "tar", "test")
    assert [p.name for p in w.files] == ["test-000000.tar"] and w.images == 25
    got = read_tar(w.files[0])
    assert list(got)[:4] == ["00000.png", "00000.cls", "00001.png", "00001.cls"] and len(got) == 50
    for i, label in enumerate(labels):
        png = tmp_path / "png" / class_folder_name(CLASSES[label]) / f"{i:05d}.png"
        assert got[f"{i:05d}.png"] == png.read_bytes()
        assert got[f"{i:05d}.cls"] == str(label).encode()


def test_layouts_tar_shard_size_sets_the_shards(split, tmp_path):
    w = layouts.export_tar(*split, tmp_path, "train", shard_size=10)
    assert [p.name for p in w.files] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [len(members(p)) for p in w.files] == [20, 20, 10]
    assert members(w.files[2])[0].name == "00020.png"  # keys are indexes in the split, not in the shard
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in w.files] + ["train.manifest.json"]


def test_layouts_tar_bytes_are_the_same_on_every_run(split, tmp_path):
    a = layouts.export_tar(*split, tmp_path / "a", "test").files[0]
    b = layouts.export_tar(*split, tmp_path / "b", "test").files[0]
    assert a.read_bytes() == b.read_bytes()
    for m in members(a):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    assert a.read_bytes()[257:265] == b"ustar\x0000"  # the POSIX ustar header, not GNU's


def test_layouts_tar_refuses_existing_shards_without_overwrite(split, tmp_path):
    first = layouts.export_tar(*split, tmp_path, "test", shard_size=10).files
    before = [p.read_bytes() for p in first]
    with pytest.raises(UserError, match="test-000000.tar exists; use --overwrite"):
        layouts.export_tar(split[0][:5], split[1][:5], tmp_path, "test")
    assert [p.read_bytes() for p in first] == before


def test_layouts_tar_overwrite_removes_the_shards_of_a_longer_export(split, tmp_path):
    layouts.export_tar(*split, tmp_path, "test", shard_size=10)
    layouts.export_tar(*split, tmp_path, "train", shard_size=10)
    w = layouts.export_tar(*split, tmp_path, "test", overwrite=True)
    assert [p.name for p in w.removed] == ["test-000001.tar", "test-000002.tar"]
    assert sorted(p.name for p in tmp_path.glob("test-*")) == ["test-000000.tar"]
    assert len(list(tmp_path.glob("train-*"))) == 3  # another split's shards are not this export's
    assert len(members(w.files[0])) == 50


def test_layouts_tar_manifest_lists_each_shard_with_its_size_and_sha256(split, tmp_path):
    w = layouts.export_tar(*split, tmp_path, "test", shard_size=10)
    listed = json.loads(layouts.manifest_path(tmp_path, "test").read_text())["shards"]
    assert listed == [{"name": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                      for p in w.files]


def test_layouts_tar_overwrite_removes_only_the_unchanged_shards_its_manifest_lists(split, tmp_path):
    layouts.export_tar(*split, tmp_path, "test", shard_size=5)  # test-000000.tar .. test-000004.tar
    with open(tmp_path / "test-000002.tar", "ab") as f:
        f.write(b"\0" * 512)  # changed since: the user's now
    (tmp_path / "test-000003.tar").write_bytes(b"x" * (tmp_path / "test-000003.tar").stat().st_size)  # same size
    (tmp_path / "test-000007.tar").write_bytes(b"mine")  # never an export's
    os.mkfifo(tmp_path / "test-000008.tar")
    w = layouts.export_tar(*split, tmp_path, "test", shard_size=10, overwrite=True)  # writes 000000 .. 000002
    assert [p.name for p in w.removed] == ["test-000004.tar"]
    assert [p.name for p, _ in w.kept] == ["test-000003.tar", "test-000007.tar", "test-000008.tar"]
    assert (tmp_path / "test-000007.tar").read_bytes() == b"mine"
    assert stat.S_ISFIFO((tmp_path / "test-000008.tar").lstat().st_mode)
    assert [e["name"] for e in json.loads((tmp_path / "test.manifest.json").read_text())["shards"]] == [
        "test-000000.tar", "test-000001.tar", "test-000002.tar"]  # what this export wrote, no more


def _manifest(tmp_path, split):
    """A manifest as the export of ``split`` wrote it, as a dict, and the file of its last shard."""
    layouts.export_tar(*split, tmp_path, "test", shard_size=10)
    return json.loads(layouts.manifest_path(tmp_path, "test").read_text()), tmp_path / "test-000002.tar"


BAD_MANIFESTS = {
    "a symbolic link": None,
    "a name outside the folder": lambda m: m["shards"][2].update(name="../test-000002.tar"),
    "a name of another pattern": lambda m: m["shards"][2].update(name="test-000002.tar.gz"),
    "a size as text": lambda m: m["shards"][2].update(size=str(m["shards"][2]["size"])),
    "a size that is a bool": lambda m: m["shards"][2].update(size=True),
    "a hash not hex": lambda m: m["shards"][2].update(sha256="z" * 64),
    "another split": lambda m: m.update(split="train"),
    "an extra field": lambda m: m.update(more=1),
    "a name twice": lambda m: m["shards"].append(m["shards"][2]),
}


@pytest.mark.parametrize("case", [*BAD_MANIFESTS, "deep JSON", "not UTF-8", "too big"])
def test_layouts_tar_a_manifest_that_is_not_an_exports_removes_nothing(case, split, tmp_path, caplog):
    manifest, last = _manifest(tmp_path, split)
    path = layouts.manifest_path(tmp_path, "test")
    if case == "a symbolic link":
        (tmp_path / "elsewhere.json").write_text(json.dumps(manifest))
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere.json")
    elif case in BAD_MANIFESTS:
        BAD_MANIFESTS[case](manifest)
        path.write_text(json.dumps(manifest))
    else:
        path.write_bytes({"deep JSON": b"[" * 100_000 + b"]" * 100_000, "not UTF-8": b'{"split": "\xff"}',
                          "too big": b" " * (layouts.MANIFEST_MAX_BYTES + 1)}[case])
    if case == "a name outside the folder":  # the file it names, with the size and hash it gives
        shutil.copyfile(last, tmp_path.parent / last.name)
    with caplog.at_level("WARNING", logger="fmnist_onnx.layouts"):
        w = layouts.export_tar(*split, tmp_path, "test", shard_size=20, overwrite=True)
    assert f"{path} not used" in caplog.text
    assert w.removed == [] and [p.name for p, _ in w.kept] == ["test-000002.tar"] and last.exists()
    assert (tmp_path.parent / last.name).exists() or case != "a name outside the folder"
    assert not path.is_symlink() and json.loads(path.read_text())["split"] == "test"  # a new one, of this export


def test_layouts_tar_a_full_disk_leaves_nothing_of_the_export(tmpfs):
    pixels = idx("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28)
    labels = idx("t10k-labels-idx1-ubyte", 8)
    disk = tmpfs(size="1m")
    earlier = layouts.export_tar(pixels[:30], labels[:30], disk, "test", shard_size=10).files  # ~90 KB
    with pytest.raises(OutputError, match="No space left on device; the .* shards written before it were "
                                          "removed") as failure:
        layouts.export_tar(pixels[:2000], labels[:2000], disk, "test", shard_size=100, overwrite=True)  # ~6 MB
    assert failure.value.exit_code == 4
    assert not [p for p in disk.iterdir() if p.name.startswith(".")]  # no temporary file
    assert not any(p.exists() for p in earlier)  # replaced, then removed with the rest of the failed export
    assert not layouts.manifest_path(disk, "test").exists() and not list(disk.glob("*.tar"))
    layouts.export_tar(pixels[:30], labels[:30], disk, "test", shard_size=10)  # a clean folder: no --overwrite


def test_layouts_tar_a_shard_that_fails_midway_is_not_left(split, tmp_path):
    pixels, labels = split
    with pytest.raises(ValueError):  # 15 labels for 25 images: the second shard fails after 5 samples
        layouts.export_tar(pixels, labels[:15], tmp_path, "test", shard_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test-000000.tar", "test.manifest.json"]
    assert len(members(tmp_path / "test-000000.tar")) == 20  # whole, and listed: a later --overwrite removes it


# ---------------------------------------------------------------------------------------------- Parquet

def test_layouts_parquet_schema_and_row_groups(split, tmp_path):
    (path,) = layouts.export_parquet(*split, tmp_path, "test", row_group_size=10).files
    assert path.name == "test-00000-of-00001.parquet"
    f = pq.ParquetFile(path)
    assert str(f.schema_arrow.field("image").type) == "struct<bytes: binary, path: string>"
    assert str(f.schema_arrow.field("label").type) == "int64"
    assert json.loads(f.schema_arrow.metadata[b"huggingface"]) == {"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": list(CLASSES), "_type": "ClassLabel"}}}}
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [10, 10, 5]
    table = f.read()
    assert table.column("label").to_pylist() == split[1].tolist()
    assert [r["path"] for r in table.column("image").to_pylist()][:2] == ["00000.png", "00001.png"]


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """The `datasets` library, offline, its caches under tmp_path: nothing written outside it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets  # imported here, after HF_HOME is set: it reads its cache folders once, on import

    return datasets


def test_layouts_parquet_reads_back_through_datasets(hf_datasets, split, tmp_path):
    pixels, labels = split
    (path,) = layouts.export_parquet(pixels, labels, tmp_path / "out", "test").files
    ds = hf_datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"].names == list(CLASSES)
    assert isinstance(ds.features["image"], hf_datasets.Image)
    assert ds["label"] == labels.tolist()
    for i, row in enumerate(ds):
        np.testing.assert_array_equal(np.asarray(row["image"]), pixels[i])


def test_layouts_parquet_schema_is_what_datasets_writes(hf_datasets, split, tmp_path):
    theirs = tmp_path / "theirs.parquet"
    buf = io.BytesIO()
    Image.fromarray(split[0][0]).save(buf, format="PNG")
    features = hf_datasets.Features({"image": hf_datasets.Image(),
                                     "label": hf_datasets.ClassLabel(names=list(CLASSES))})
    hf_datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": "00000.png"}], "label": [1]},
                                  features=features).to_parquet(theirs)
    (ours,) = layouts.export_parquet(*split, tmp_path / "out", "test").files
    assert pq.read_schema(ours).equals(pq.read_schema(theirs), check_metadata=True)


def test_layouts_parquet_a_full_disk_keeps_the_earlier_file(split, tmpfs):
    disk = tmpfs(size="1m")
    (path,) = layouts.export_parquet(*split, disk, "test").files
    before = path.read_bytes()
    pixels = idx("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28)[:5000]  # ~1.7 MB of PNGs
    with pytest.raises(OutputError, match="cannot write .*test-00000-of-00001.parquet: No space left") as failure:
        layouts.export_parquet(pixels, idx("t10k-labels-idx1-ubyte", 8)[:5000], disk, "test", overwrite=True)
    assert failure.value.exit_code == 4
    assert [p.name for p in disk.iterdir()] == [path.name] and path.read_bytes() == before


def test_layouts_parquet_refuses_an_existing_file_without_overwrite(split, tmp_path):
    (path,) = layouts.export_parquet(*split, tmp_path, "test").files
    before = path.read_bytes()
    with pytest.raises(UserError, match="exists; use --overwrite"):
        layouts.export_parquet(split[0][:3], split[1][:3], tmp_path, "test")
    assert path.read_bytes() == before
    layouts.export_parquet(split[0][:3], split[1][:3], tmp_path, "test", overwrite=True)
    assert pq.ParquetFile(path).metadata.num_rows == 3
