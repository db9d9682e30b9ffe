"""classify/sources/folder.py: the walk of local files and folders."""

from __future__ import annotations

import os

from fmnist_onnx.classify.sources.folder import iter_files


def test_walk_is_sorted_recursive_and_skips_non_images(tmp_path):
    for rel in ("b/2.png", "b/1.PNG", "a/z/3.jpg", "a/notes.txt", "c.webp", "d.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "b" / "loop")  # a folder reached twice is walked once
    found = list(iter_files([tmp_path]))
    files = [os.path.relpath(f.path, tmp_path) for f in found if f.kind == "file"]
    skipped = [os.path.relpath(f.path, tmp_path) for f in found if f.kind == "skip"]
    assert files == ["a/z/3.jpg", "b/1.PNG", "b/2.png", "c.webp"]
    assert sorted(skipped) == ["a/notes.txt", "d.csv"]
    flat = [os.path.relpath(f.path, tmp_path) for f in iter_files([tmp_path], recursive=False)
            if f.kind == "file"]
    assert flat == ["c.webp"]
    named = list(iter_files([tmp_path / "d.csv"]))  # a file named on the command line is an input
    assert [f.kind for f in named] == ["file"]


def test_walk_leaves_out_excluded_files_however_their_folder_is_reached(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x.png", "preds.confusion.png", "preds.csv", "preds.csv.partial"):
        (tmp_path / "a" / name).write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    exclude = [tmp_path / "a" / n for n in ("preds.confusion.png", "preds.csv", "preds.csv.partial", "absent.png")]
    found = [(os.path.relpath(f.path, tmp_path), f.kind) for f in iter_files([tmp_path / "link"],
                                                                                     exclude=exclude)]
    assert found == [("link/x.png", "file")]  # neither an input nor counted as skipped
