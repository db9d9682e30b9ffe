"""classify/sources/__init__.py: what the inputs name. Folders of shards written by the tools people use
(WebDataset's ShardWriter, Python's tarfile, the Hugging Face layout written by `datasets`) read as their
shards named one by one; WebDataset's brace patterns; a run that finds no image; the mixed folder."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmnist_onnx.classify import sources
from fmnist_onnx.classify.run_files import record_path
from fmnist_onnx.errors import UserError
from fmnist_onnx.journal import journal_path
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import read_rows
from harness import assert_one_line_error, cli_run, run_cli

PER_CLASS = 12


@pytest.fixture(scope="module")
def pngs(test_pngs) -> list[tuple[str, bytes, int]]:
    """120 test PNGs (12 a class): (name in the ImageFolder layout, bytes, class), in the folder walk's order."""
    out = []
    for sub in sorted(c.replace("/", "-") for c in CLASSES):
        cls = [c.replace("/", "-") for c in CLASSES].index(sub)
        out += [(f"{sub}/{p.name}", p.read_bytes(), cls) for p in sorted((test_pngs / sub).glob("*.png"))[:PER_CLASS]]
    return out


@pytest.fixture(scope="module")
def png_rows(pngs, onnx_model, tmp_path_factory) -> list[dict]:
    """The images classified as a PNG folder: the reference, in the same order as ``pngs``."""
    d = tmp_path_factory.mktemp("png_folder")
    for name, data, _ in pngs:
        (d / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "in" / name).write_bytes(data)
    summary, rows = _classify(onnx_model, d / "in", out=d / "p.csv")
    assert summary["files"] == len(pngs) and summary["accuracy_pct"] is not None
    return rows


def _classify(model: Path, *args, out: Path, code: int = 0) -> tuple[dict, list[dict]]:
    proc = run_cli("classify", *args, "-m", model, "-o", out, "--json", "--workers", "2")
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout), list(read_rows(out))


def _same_images(rows: list[dict], png_rows: list[dict]) -> None:
    """Rows of the same images, in the same order: equal labels and true classes to the PNG folder's."""
    assert [(r["label"], r["true_label"]) for r in rows] == [(r["label"], r["true_label"]) for r in png_rows]


def write_webdataset(folder: Path, pngs, per_shard: int) -> list[Path]:
    """WebDataset's own writer: ShardWriter, a .png and a .cls per sample (its TarWriter: a PAX header each)."""
    import webdataset as wds

    folder.mkdir()
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (_, data, cls) in enumerate(pngs):
            sink.write({"__key__": f"{i:05d}", "png": data, "cls": cls})
    return sorted(folder.glob("*.tar"))


def write_tarfile(folder: Path, pngs, per_shard: int) -> list[Path]:
    """Python's tarfile with its defaults (PAX format), the same layout."""
    folder.mkdir()
    for start in range(0, len(pngs), per_shard):
        with tarfile.open(folder / f"train-{start // per_shard:06d}.tar", "w") as tar:
            for i, (_, data, cls) in enumerate(pngs[start:start + per_shard], start):
                for name, payload in ((f"{i:05d}.png", data), (f"{i:05d}.cls", str(cls).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return sorted(folder.glob("*.tar"))


@pytest.mark.parametrize("writer", [write_webdataset, write_tarfile])
def test_a_folder_of_tar_shards_reads_as_its_shards_named_one_by_one(writer, pngs, png_rows, onnx_model, tmp_path):
    shards = writer(tmp_path / "shards", pngs, 25)
    (tmp_path / "shards" / "README.txt").write_text("not an image, not a shard")
    summary, rows = _classify(onnx_model, tmp_path / "shards", out=tmp_path / "f.csv")
    _, named = _classify(onnx_model, *shards, out=tmp_path / "n.csv")
    assert len(shards) == 5 and summary["skipped"] == 1 and summary["containers_skipped"] == 0
    assert [r["path"] for r in rows] == [r["path"] for r in named]
    assert rows[0]["path"] == f"{tmp_path}/shards/train-000000.tar::00000.png"
    _same_images(rows, png_rows)
    assert summary["accuracy_pct"] is not None


@pytest.fixture(scope="module")
def hub(pngs, tmp_path_factory) -> Path:
    """A dataset as the Hugging Face Hub keeps it: README.md at the root, its Parquet shards in
    data/train-0000N-of-00003.parquet, each written by `datasets` (Dataset.to_parquet of each shard)."""
    import datasets

    root = tmp_path_factory.mktemp("hub") / "fashion"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": d, "path": None} for _, d, _ in pngs],
                                     "label": [c for _, _, c in pngs]}, features=features)
    for i in range(3):
        ds.shard(num_shards=3, index=i, contiguous=True).to_parquet(root / "data" / f"train-{i:05d}-of-00003.parquet")
    return root


def test_a_hub_dataset_folder_reads_its_data_parquet_shards(hub, pngs, png_rows, onnx_model, tmp_path):
    """The dataset's root, its shards in data/: found by the recursive walk, read in name order."""
    shards = sorted((hub / "data").glob("*.parquet"))
    summary, rows = _classify(onnx_model, hub, out=tmp_path / "f.csv")
    _, named = _classify(onnx_model, *shards, out=tmp_path / "n.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in named]
    assert rows[0]["path"] == f"{hub}/data/train-00000-of-00003.parquet::row/0" and len(rows) == len(pngs)
    assert summary["skipped"] == 1  # README.md
    _same_images(rows, png_rows)
    proc = run_cli("classify", hub, "--no-recursive", "-m", onnx_model, "-o", tmp_path / "flat.csv")
    assert_one_line_error(proc, 2, f"no images in {hub}: 1 .md file skipped")


def test_a_parquet_output_inside_the_folder_of_shards_is_no_shard(hub, onnx_model, tmp_path):
    """The run's own output, left out of the walk, is not checked or read as a shard of the folder: the
    --resume of the finished run (with --image-column, which every shard must have) finds it complete."""
    shutil.copytree(hub, tmp_path / "hub")
    out = tmp_path / "hub" / "data" / "preds.parquet"
    summary, _ = _classify(onnx_model, tmp_path / "hub", "--image-column", "image", out=out)
    proc = run_cli("classify", tmp_path / "hub", "--image-column", "image", "-m", onnx_model, "-o", out, "--resume")
    assert proc.returncode == 0 and f"complete already: {summary['files']} rows" in proc.stderr, proc.stderr


def test_a_brace_pattern_reads_the_shards_it_names_and_resumes_as_named(pngs, png_rows, onnx_model, tmp_path):
    shards = write_webdataset(tmp_path / "shards", pngs, 25)
    pattern = f"{tmp_path}/shards/train-{{000001..000003}}.tar"
    out = tmp_path / "p.csv"
    summary, rows = _classify(onnx_model, pattern, out=out)
    _, named = _classify(onnx_model, *shards[1:4], out=tmp_path / "n.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in named] and len(rows) == 75
    _same_images(rows, png_rows[25:100])
    assert json.loads(record_path(out).read_text())["inputs"] == [pattern]  # as named, not as expanded
    proc = run_cli("classify", pattern, "-m", onnx_model, "-o", out, "--resume")
    assert proc.returncode == 0 and "complete already: 75 rows" in proc.stderr, proc.stderr


def test_a_missing_name_of_a_pattern_is_one_line(pngs, onnx_model, tmp_path):
    write_tarfile(tmp_path / "shards", pngs, 40)  # train-000000 to 000002
    pattern = f"{tmp_path}/shards/train-{{000000..000004}}.tar"
    proc = cli_run("classify", pattern, "-m", onnx_model, "-o", tmp_path / "p.csv")  # a refusal: in this process
    assert_one_line_error(proc, 2, f"{tmp_path}/shards/train-000003.tar: no such file or folder (the pattern "
                                   f"{pattern}: 2 of its 5 names missing)")
    assert not list(tmp_path.glob("p.csv*"))


def test_a_pattern_of_too_many_names_is_one_line_before_it_is_expanded(onnx_model, tmp_path):
    """braceexpand holds a range as a list: 10^11 names are refused by their count, not by memory."""
    proc = run_cli("classify", f"{tmp_path}/s-{{0..99999999999}}.tar", "-m", onnx_model)
    assert_one_line_error(proc, 2, "the pattern makes 100,000,000,000 names, more than 100,000")


@pytest.mark.parametrize("pattern", ["a{1..3}b", "{000008..000011}", "{a,b{c,d}}e{0..9..3}", "{a..e..2}{z..x}",
                                     "x{,y}", "{{1..2},{3..4}}", "a{b}c", "a\\{1,2}", "{1{2,3}", "}{{}", "{5..-2..3}",
                                     "{{a,b}{c,d},e}"])
def test_pattern_names_are_counted_as_braceexpand_makes_them(pattern):
    from braceexpand import braceexpand

    try:
        made = len(list(braceexpand(pattern)))
    except ValueError:
        with pytest.raises(ValueError):
            sources._count(pattern)
    else:
        assert sources._count(pattern) == made


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([*"{},.\\aZ1-0", "..", "{1..3}", "{a..c}", "{0..4..2}", "{09..11}"]), max_size=8))
def test_any_pattern_is_counted_as_braceexpand_makes_it(parts):
    test_pattern_names_are_counted_as_braceexpand_makes_them("".join(parts))


@pytest.mark.parametrize("files, found", [
    ([f"{i}.foo" for i in range(6)], "6 .foo files skipped"),
    ([], "no files in it"),
])
def test_a_run_that_finds_no_image_is_one_line_exit_2(files, found, onnx_model, tmp_path):
    (tmp_path / "in").mkdir()
    for name in files:
        (tmp_path / "in" / name).write_bytes(b"x")
    out = tmp_path / "p.csv"
    proc = run_cli("classify", tmp_path / "in", "-m", onnx_model, "-o", out)
    assert_one_line_error(proc, 2, f"Error: no images in {tmp_path}/in: {found}")
    assert len(proc.stderr.splitlines()) == 1  # said before the provider line and any progress
    assert not list(tmp_path.glob("p.csv*")) and not journal_path(out).exists()


def test_shards_without_images_are_one_line_exit_2(onnx_model, tmp_path):
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "a.tar", "w") as tar:
        for name in ("x.txt", "y.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    proc = run_cli("classify", tmp_path / "in", "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert_one_line_error(proc, 2, f"no images in {tmp_path}/in: 1 tar archive read, 2 .txt files skipped")


def test_a_folder_of_images_and_shards_reads_the_images_and_names_the_shards(pngs, onnx_model, tmp_path):
    """The mixed case: images are read, the archives beside them skipped and named in the summary with the
    command that reads them; that command reads them."""
    folder = tmp_path / "in"
    write_tarfile(folder, pngs[:20], 10)
    (folder / "loose.png").write_bytes(pngs[30][1])
    summary, rows = _classify(onnx_model, folder, out=tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [f"{folder}/loose.png"]
    assert (summary["skipped"], summary["containers_skipped"]) == (2, 2)
    assert summary["containers_skipped_first"] == [f"{folder}/train-000000.tar", f"{folder}/train-000001.tar"]
    proc = run_cli("classify", folder, "-m", onnx_model, "-o", tmp_path / "q.csv")
    line = next(x for x in proc.stderr.splitlines() if "archives or Parquet files" in x)
    command = shlex.split(line.partition("name them: fmnist-onnx ")[2])
    assert command == ["classify", f"{folder}/train-000000.tar", f"{folder}/train-000001.tar"]
    _, named = _classify(onnx_model, *command[1:], out=tmp_path / "r.csv")
    assert len(named) == 20


def test_a_folder_of_shards_is_checked_as_its_shards(onnx_model, tmp_path):
    """A shard that cannot be opened is the line naming it one by one gives, before any work; a shard named
    beside its folder would be read twice."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"not parquet")
    proc = run_cli("classify", tmp_path / "in", "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert_one_line_error(proc, 2, f"{tmp_path}/in/a.parquet: not a readable Parquet file")
    (tmp_path / "in" / "a.parquet").unlink()
    with tarfile.open(tmp_path / "in" / "a.tar", "w"):
        pass
    with pytest.raises(UserError, match="are the same"):
        sources.check_inputs([str(tmp_path / "in"), str(tmp_path / "in" / "a.tar")], ["folder", "tar"], "local")


def test_inputs_tell_folders_of_shards_by_what_lies_under_them(tmp_path):
    for rel in ("shards/sub/a.tar", "shards/sub/b.zip", "shards/notes.txt", "mixed/a.tar", "mixed/deep/x.png",
                "empty/.keep"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    named = [str(tmp_path / n) for n in ("shards", "mixed", "empty")]
    assert [k for _, k in sources.inputs(named)] == ["shards", "folder", "folder"]
    assert [k for _, k in sources.inputs(named, recursive=False)] == ["folder", "shards", "folder"]
    assert sources.kinds(named) == ["tar", "zip", "folder"]
    assert os.path.basename(sources.inputs([str(tmp_path / "{shards,mixed}")])[1][0]) == "mixed"
