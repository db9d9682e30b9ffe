"""The tar and zip sources (classify/sources/tar.py, zip.py): archives read in place, rows named
``<archive>::<member>`` (a repeated name ``<member>::<k>``, a loose file with ``::`` escaped), true classes from
.cls sidecars or the ImageFolder layout inside, and damaged or hostile archives (rows for what could be read,
one error row where it broke, nothing ever extracted)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from test_archives import WRITERS, archive

from fmnist_onnx.journal import journal_path
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import read_rows
from fmnist_onnx.testing import CLASSIFY_AFTER_CHUNK
from harness import Held, assert_one_line_error, assert_report_draws, run_cli

PER_CLASS = 20


@pytest.fixture(scope="module")
def pngs(test_pngs) -> list[tuple[str, bytes]]:
    """200 test PNGs (20 a class): (name in the ImageFolder layout, bytes)."""
    out = []
    for name in CLASSES:
        sub = name.replace("/", "-")
        out += [(f"{sub}/{p.name}", p.read_bytes()) for p in sorted((test_pngs / sub).glob("*.png"))[:PER_CLASS]]
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _classify(*args, code: int = 0) -> tuple[dict, list[dict]]:
    out = Path(args[args.index("-o") + 1])
    proc = run_cli("classify", *args, "--json", "--workers", "2")
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout), list(read_rows(out))


def test_a_tar_in_the_imagefolder_layout_classifies_as_the_folder_does(pngs, test_pngs, onnx_model, tmp_path):
    tar = write_tar(tmp_path / "t.tar", pngs)
    summary, rows = _classify(tar, "-m", onnx_model, "-o", tmp_path / "t.csv")
    assert [r["path"] for r in rows] == [f"{tar}::{n}" for n, _ in pngs]
    assert [r["true_label"] for r in rows] == [CLASSES[i // PER_CLASS] for i in range(len(pngs))]
    folder = tmp_path / "dir"
    for name, data in pngs:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    s_dir, rows_dir = _classify(folder, "-m", onnx_model, "-o", tmp_path / "d.csv")
    by_name = {str(Path(r["path"]).relative_to(folder)): r["label"] for r in rows_dir}  # the walk sorts names
    assert {r["path"].partition("::")[2]: r["label"] for r in rows} == by_name
    assert summary["accuracy_pct"] == s_dir["accuracy_pct"] is not None


def test_webdataset_shards_from_export_png_give_the_labels_of_the_sidecars(onnx_model, test_pngs, tmp_path):
    run_cli("data", "export-png", "--format", "tar", "--shard-size", "100", "--limit", "250", "--out",
            tmp_path / "shards", "--quiet", check=True)
    # the same 250 images as PNG files in their class folders: test_pngs's (data export-png's) 00000-00249
    for png in test_pngs.glob("*/*.png"):
        if int(png.stem) < 250:
            (tmp_path / "pngs" / png.parent.name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "pngs" / png.parent.name / png.name).write_bytes(png.read_bytes())
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    summary, rows = _classify(*shards, "-m", onnx_model, "-o", tmp_path / "s.jsonl")
    _, rows_png = _classify(tmp_path / "pngs", "-m", onnx_model, "-o", tmp_path / "p.jsonl")
    by_name = {Path(r["path"]).name: r for r in rows_png}
    assert len(shards) == 3 and len(rows) == 250 and summary["skipped"] == 0
    for r in rows:
        png = by_name[r["path"].rpartition("::")[2]]
        assert (r["label"], r["true_label"]) == (png["label"], png["true_label"]), r


@pytest.mark.parametrize("name, mode", [("t.tar.gz", "w:gz"), ("t.txz", "w:xz")])  # every suffix archives knows
def test_a_compressed_tar_is_streamed_to_the_same_rows(pngs, onnx_model, tmp_path, name, mode):
    plain = write_tar(tmp_path / "t.tar", pngs[:50])
    packed = write_tar(tmp_path / name, pngs[:50], mode)
    _, rows = _classify(plain, "-m", onnx_model, "-o", tmp_path / "a.csv")
    _, rows_gz = _classify(packed, "-m", onnx_model, "-o", tmp_path / "b.csv")
    assert [(r["path"].rpartition("::")[2], r["label"]) for r in rows] == [
        (r["path"].rpartition("::")[2], r["label"]) for r in rows_gz]


def test_a_truncated_tar_gives_rows_up_to_the_damage_then_one_error_row(pngs, onnx_model, tmp_path):
    whole = write_tar(tmp_path / "w.tar", pngs[:40]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:len(whole) // 2])
    summary, rows = _classify(cut, "-m", onnx_model, "-o", tmp_path / "c.csv", code=3)
    good = [r for r in rows if not r["error"]]
    assert 10 < len(good) < 25 and [r["path"] for r in good] == [f"{cut}::{n}" for n, _ in pngs[:len(good)]]
    broken = rows[len(good):]
    assert len(broken) <= 2 and broken[-1]["path"] == f"{cut}::" and "byte" in broken[-1]["error"]


def test_names_with_dot_dot_and_absolute_paths_are_rows_and_nothing_is_written(pngs, onnx_model, tmp_path):
    tar = write_tar(tmp_path / "evil.tar", [("../../escape.png", pngs[0][1]), ("/etc/evil.png", pngs[1][1])])
    before = sorted(os.listdir(tmp_path.parent)), sorted(os.listdir(tmp_path))
    _, rows = _classify(tar, "-m", onnx_model, "-o", tmp_path / "e.csv")
    assert [r["path"] for r in rows] == [f"{tar}::../../escape.png", f"{tar}::/etc/evil.png"]
    assert all(r["error"] is None for r in rows)
    assert sorted(os.listdir(tmp_path.parent)) == before[0] and not os.path.exists("/etc/evil.png")
    assert sorted(os.listdir(tmp_path)) == sorted(before[1] + ["e.csv", "e.csv.run.json"])


def test_a_zip_classifies_and_a_bomb_member_is_an_error_row(pngs, onnx_model, tmp_path):
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in pngs[:30]:
            z.writestr(name, data)
        with z.open("Bag/bomb.png", "w", force_zip64=True) as f:  # 300 MB of zeros, 300 KB deflated
            block = b"\0" * (1 << 20)
            for _ in range(300):
                f.write(block)
    summary, rows = _classify(path, "-m", onnx_model, "-o", tmp_path / "z.csv", code=3)
    assert [r["path"] for r in rows] == [f"{path}::{n}" for n, _ in pngs[:30]] + [f"{path}::Bag/bomb.png"]
    assert all(r["error"] is None for r in rows[:30]) and "too large" in rows[30]["error"]
    assert summary["failed"] == 1


def test_an_archive_inside_a_walked_folder_is_skipped_and_counted(pngs, onnx_model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(pngs[0][1])
    write_tar(tmp_path / "in" / "more.tar", pngs[1:5])
    summary, rows = _classify(tmp_path / "in", "-m", onnx_model, "-o", tmp_path / "o.csv")
    assert [Path(r["path"]).name for r in rows] == ["a.png"] and summary["skipped"] == 1


def test_a_file_that_is_not_a_tar_is_one_error_row(onnx_model, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 40)
    _, rows = _classify(bad, "-m", onnx_model, "-o", tmp_path / "b.csv", code=3)
    assert [r["path"] for r in rows] == [f"{bad}::"] and rows[0]["error"]


def test_a_missing_archive_is_one_line(onnx_model, tmp_path):
    assert_one_line_error(run_cli("classify", tmp_path / "gone.tar", "-m", onnx_model), 2, "gone.tar")


def write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def _killed_after_first_chunk(archive: Path, onnx_model: Path, out: Path) -> int:
    """A one-worker classify of ``archive`` SIGKILLed (its process group) once its first chunk is journaled;
    the rows its journal keeps."""
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(archive), "-m", str(onnx_model), "-o", str(out),
           "--workers", "1"]
    with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:1", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.PIPE, text=True) as held:
        held.wait()
        os.killpg(held.proc.pid, signal.SIGKILL)
        held.proc.wait()
    return journal_path(out).read_bytes().count(b"\n") - 1


@pytest.mark.parametrize("name", ["t.tar", "t.tar.gz", "t.zip"])  # read at offsets, streamed, by index
def test_sigkill_then_resume_gives_every_member_once(pngs, onnx_model, tmp_path, name):
    path = tmp_path / name
    tar = write_zip(path, pngs) if name.endswith(".zip") else write_tar(path, pngs, "w:gz" if ".gz" in name else "w")
    out = tmp_path / "t.csv"
    done = _killed_after_first_chunk(tar, onnx_model, out)
    assert 0 < done < len(pngs)
    summary, rows = _classify(tar, "-m", onnx_model, "-o", out, "--resume")
    assert summary["resumed"] == done and sorted(r["path"] for r in rows) == sorted(f"{tar}::{n}" for n, _ in pngs)
    assert summary["accuracy_pct"] is not None


def test_the_report_draws_members_from_inside_the_archive(pngs, onnx_model, tmp_path):
    tar = write_tar(tmp_path / "t.tar", pngs)
    _classify(tar, "-m", onnx_model, "-o", tmp_path / "t.csv")
    assert_report_draws(tmp_path / "t.csv", tmp_path / "r.html")


@pytest.fixture(scope="module")
def image_folder(pngs, onnx_model, tmp_path_factory) -> tuple[Path, dict]:
    """The 200 PNGs as a folder in the ImageFolder layout, and its rows by path inside it."""
    root = tmp_path_factory.mktemp("writers") / "data"
    for name, data in pngs:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    _, rows = _classify(root, "-m", onnx_model, "-o", root.parent / "folder.csv")
    return root, {str(Path(r["path"]).relative_to(root.parent)): r for r in rows}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_tar_of_each_writer_classifies_as_its_folder(image_folder, onnx_model, tmp_path, writer):
    root, by_name = image_folder
    tar = archive(writer, root, tmp_path / "t.tar")
    summary, rows = _classify(tar, "-m", onnx_model, "-o", tmp_path / "t.csv")
    assert sorted(r["path"] for r in rows) == sorted(f"{tar}::{n}" for n in by_name)
    for r in rows:
        want = by_name[r["path"].partition("::")[2]]
        assert (r["label"], r["true_label"], r["error"]) == (want["label"], want["true_label"], None), r
    assert summary["skipped"] == 0 and summary["accuracy_pct"] is not None


def test_links_in_a_tar_are_rows_of_their_targets_and_other_members_are_counted(pngs, onnx_model, tmp_path):
    """GNU tar of a folder of 13 PNGs, two of them hard links and one a symlink: 13 rows, the links' labels
    their targets'; a symlink out of the folder, a FIFO: skipped, named by kind. In a .tar.gz the links' targets
    have streamed past: error rows."""
    root = tmp_path / "pngs"
    root.mkdir()
    for name, data in pngs[:10]:
        (root / Path(name).name).write_bytes(data)
    first, second = sorted(root.iterdir())[:2]
    os.link(first, root / "x-hard-1.png")
    os.link(second, root / "x-hard-2.png")
    os.symlink(first.name, root / "x-soft.png")
    os.symlink("/nowhere/y.png", root / "y-out.png")
    os.mkfifo(root / "z-pipe")
    tar, tgz = tmp_path / "t.tar", tmp_path / "t.tar.gz"
    for path, flag in ((tar, "-cf"), (tgz, "-czf")):
        subprocess.run(["tar", "--sort=name", flag, path, "-C", tmp_path, "pngs"], check=True)
    summary, rows = _classify(tar, "-m", onnx_model, "-o", tmp_path / "t.csv")
    labels = {r["path"].rpartition("/")[2]: r["label"] for r in rows}
    assert len(rows) == summary["classified"] == 13 and summary["failed"] == 0
    assert labels["x-hard-1.png"] == labels["x-soft.png"] == labels[first.name]
    assert labels["x-hard-2.png"] == labels[second.name]
    assert summary["skipped"] == 2 and summary["skipped_kinds"] == {"FIFO": 1, "symlink": 1}
    text = run_cli("classify", tar, "-m", onnx_model, "-o", tmp_path / "u.csv", check=True).stderr  # with -o
    assert "13 of 13 files classified, 0 failed, 2 other files skipped (of them 1 FIFO, 1 symlink to nothing in " \
           "its archive)." in text
    summary, rows = _classify(tgz, "-m", onnx_model, "-o", tmp_path / "g.csv", code=3)
    errors = {r["path"].rpartition("/")[2] for r in rows if r["error"]}
    assert len(rows) == 13 and errors == {"x-hard-1.png", "x-hard-2.png", "x-soft.png"}
    assert summary["skipped_kinds"] == {"FIFO": 1, "symlink": 1}


# ---------------------------------------------------------------------------------------------- repeated names

def write_zip_repeating(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A zip by Python's zipfile, which writes a repeated name with a warning."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name: ..."
        for name, data in members:
            z.writestr(name, data)
    return path


def write_with_tools(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """GNU ``tar -r`` or Info-ZIP ``zip`` then ``zipnote``: each member appended from a file on disk, a repeated
    name by appending the file again (tar) or renaming the entry (zipnote: zip itself would replace it)."""
    work = path.parent / f"{path.name}.files"
    renames = {}
    for i, (name, data) in enumerate(members):
        (work / f"{i}").mkdir(parents=True)
        (work / f"{i}" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / f"{i}" / name).write_bytes(data)
        if path.suffix == ".tar":
            subprocess.run(["tar", "-rf", path, "-C", work / f"{i}", name], check=True)
        else:  # zip would replace an entry of that name: add it under another, then rename it
            (work / f"{i}" / name).rename(work / f"{i}" / f"{name}.{i}")
            subprocess.run(["zip", "-q", path, f"{name}.{i}"], cwd=work / f"{i}", check=True)
            renames[f"@ {name}.{i}"] = f"@={name}"
    if renames:  # zipnote -w takes zipnote's whole listing back, each new name after its entry's line
        listing = subprocess.run(["zipnote", path], capture_output=True, text=True, check=True).stdout
        edited = "".join(f"{line}\n{renames[line]}\n" if line in renames else f"{line}\n"
                         for line in listing.splitlines())
        subprocess.run(["zipnote", "-w", path], input=edited, text=True, check=True)
    return path


WRITERS = {"t.tar": write_tar, "t.tar.gz": lambda p, m: write_tar(p, m, "w:gz"), "t.zip": write_zip_repeating,
           "gnu.tar": write_with_tools, "infozip.zip": write_with_tools}


@pytest.fixture(scope="module")
def twins(pngs, onnx_model, tmp_path_factory) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Members naming two images of different classes alike (each with its sidecar), another between them; and
    the labels each image gets as a loose file (the model tells them apart: a mixup would show)."""
    shirt, trousers, bag = pngs[0][1], pngs[PER_CLASS][1], pngs[8 * PER_CLASS][1]
    members = [("s/x.png", shirt), ("s/x.cls", b"0"), ("s/y.png", trousers), ("s/y.cls", b"1"),
               ("s/x.png", bag), ("s/x.cls", b"8")]
    loose = tmp_path_factory.mktemp("twins")
    for name, data in (("1.png", shirt), ("2.png", trousers), ("3.png", bag)):
        (loose / name).write_bytes(data)
    _, rows = _classify(loose, "-m", onnx_model, "-o", loose / "l.csv")
    labels = [r["label"] for r in rows]
    assert labels[0] != labels[2]
    return members, labels


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_repeated_member_name_gives_each_member_its_row_image_and_sidecar(twins, onnx_model, tmp_path, name):
    members, labels = twins
    path = WRITERS[name](tmp_path / name, members)
    _, rows = _classify(path, "-m", onnx_model, "-o", tmp_path / "t.csv")
    assert [(r["path"], r["label"], r["true_label"]) for r in rows] == [
        (f"{path}::s/x.png", labels[0], "T-shirt/top"), (f"{path}::s/y.png", labels[1], "Trouser"),
        (f"{path}::s/x.png::2", labels[2], "Bag")]


@pytest.mark.parametrize("name", ["t.tar", "t.tar.gz", "t.zip"])  # read at offsets, streamed, by index
def test_sigkill_then_resume_gives_each_repeated_member_once(pngs, onnx_model, tmp_path, name):
    # the second hundred repeat the first hundred's names: a repeat comes after the first chunk is journaled
    members = [m for i, (_, data) in enumerate(pngs)
               for m in ((f"s/{i % 100:03d}.png", data), (f"s/{i % 100:03d}.cls", str(i // PER_CLASS).encode()))]
    path = WRITERS[name](tmp_path / name, members)
    out = tmp_path / "t.csv"
    done = _killed_after_first_chunk(path, onnx_model, out)
    assert 0 < done < 100
    summary, rows = _classify(path, "-m", onnx_model, "-o", out, "--resume")
    want = {f"{path}::s/{i % 100:03d}.png{'::2' if i >= 100 else ''}": CLASSES[i // PER_CLASS] for i in range(200)}
    assert summary["resumed"] == done and len(rows) == 200
    assert {r["path"]: r["true_label"] for r in rows} == want


def drawn(page: Path) -> dict[str, bytes]:
    """{a figure's row name: the original image it shows} of a report page (a small PNG is embedded as it is)."""
    found = re.findall(r'<img class="orig[^"]*" src="data:image/png;base64,([^"]+)"[^>]*></div><figcaption>'
                       r'<code class="path">([^<]*)</code>', page.read_text())
    return {html.unescape(row): base64.b64decode(data) for data, row in found}


@pytest.mark.parametrize("name", ["a.tar", "a.tar.gz", "a.zip"])
def test_the_report_draws_each_repeat_and_the_loose_file_named_like_a_member(twins, onnx_model, tmp_path, name):
    members, _ = twins
    (tmp_path / "in").mkdir()
    path = WRITERS[name.replace("a.", "t.")](tmp_path / "in" / name, members)
    loose = tmp_path / "in" / f"{name}::s/x.png"  # a folder named like the archive and '::', and x.png in it
    loose.parent.mkdir()
    loose.write_bytes(members[2][1])  # the trousers
    _, rows = _classify(path, loose, "-m", onnx_model, "-o", tmp_path / "t.csv")
    escaped = str(tmp_path / "in" / name) + "\\:\\:s/x.png"
    assert [r["path"] for r in rows] == [f"{path}::s/x.png", f"{path}::s/y.png", f"{path}::s/x.png::2", escaped]
    assert run_cli("report", tmp_path / "t.csv", "-o", tmp_path / "r.html").returncode == 0
    assert drawn(tmp_path / "r.html") == {f"{path}::s/x.png": members[0][1], f"{path}::s/y.png": members[2][1],
                                          f"{path}::s/x.png::2": members[4][1], escaped: members[2][1]}
