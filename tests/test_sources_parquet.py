"""The Parquet source (classify/sources/parquet.py): the Hugging Face layout read as it is, rows named
``<file>::row/N``, true classes from the label column, the column named by --image-column, and damaged or
unusable files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmnist_onnx.images import ImageError
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import read_rows
from fmnist_onnx.testing import CLASSIFY_AFTER_CHUNK, CLASSIFY_BEFORE_ENGINE
from harness import Held, assert_one_line_error, assert_report_draws, run_cli

HUB_NAMES = ["T - shirt / top", *CLASSES[1:]]  # the Hub's fashion_mnist spells the first class so
PER_CLASS = 30


@pytest.fixture(scope="module")
def samples(test_pngs, tmp_path_factory) -> tuple[Path, list[tuple[str, bytes, int]]]:
    """300 test PNGs (30 a class) copied into a folder of their own, and (relative path, bytes, class) each,
    in the folder walk's order."""
    folder = tmp_path_factory.mktemp("pq") / "pngs"
    out = []
    for c, name in enumerate(CLASSES):
        sub = name.replace("/", "-")
        (folder / sub).mkdir(parents=True)
        for src in sorted((test_pngs / sub).glob("*.png"))[:PER_CLASS]:
            shutil.copy(src, folder / sub / src.name)
            out.append((f"{sub}/{src.name}", src.read_bytes(), c))
    return folder, sorted(out)


def write_hub(path: Path, samples: list, row_group_size: int = 64, names: list | None = HUB_NAMES) -> Path:
    """The Hugging Face layout: an image struct of bytes and path, a label, the ClassLabel in the metadata."""
    table = pa.table({"image": pa.array([{"bytes": b, "path": p} for p, b, _ in samples]),
                      "label": pa.array([c for _, _, c in samples], pa.int64())})
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _classify(*args) -> tuple[dict, list[dict]]:
    out = Path(args[args.index("-o") + 1])
    proc = run_cli("classify", *args, "--json", "--workers", "2")
    assert proc.returncode in (0, 3), proc.stderr
    return json.loads(proc.stdout), list(read_rows(out))


def test_hub_layout_gives_the_folders_labels_and_accuracy(samples, onnx_model, tmp_path):
    folder, items = samples
    table = write_hub(tmp_path / "train-00000.parquet", items)
    s_pq, rows_pq = _classify(table, "-m", onnx_model, "-o", tmp_path / "pq.csv")
    s_dir, rows_dir = _classify(folder, "-m", onnx_model, "-o", tmp_path / "dir.csv")
    assert [r["path"] for r in rows_pq] == [f"{table}::row/{i}" for i in range(len(items))]
    assert [r["label"] for r in rows_pq] == [r["label"] for r in rows_dir]  # both in the same (sorted) order
    assert [r["true_label"] for r in rows_pq] == [CLASSES[c] for _, _, c in items]
    assert s_pq["accuracy_pct"] == s_dir["accuracy_pct"] is not None and s_pq["files"] == len(items)


def test_a_table_written_by_datasets_classifies(samples, onnx_model, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the test extra installs datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _, items = samples
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=HUB_NAMES)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": p} for p, b, _ in items],
                                     "label": [c for _, _, c in items]}, features=features)
    ds.to_parquet(tmp_path / "hub.parquet")
    summary, rows = _classify(tmp_path / "hub.parquet", "-m", onnx_model, "-o", tmp_path / "p.jsonl")
    assert [r["true_label"] for r in rows] == [CLASSES[c] for _, _, c in items]
    assert summary["accuracy_pct"] > 70 and summary["failed"] == 0


def test_a_binary_column_without_labels_has_no_true_class(samples, onnx_model, tmp_path):
    _, items = samples
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"png": pa.array([b for _, b, _ in items], pa.binary())}), path)
    summary, rows = _classify(path, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert summary["classified"] == len(items) and summary["accuracy_pct"] is None
    assert all(r["true_label"] is None for r in rows)


def test_no_image_column_is_one_line_before_any_work(onnx_model, tmp_path):
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"x": [1, 2], "name": ["a", "b"]}), path)
    proc = run_cli("classify", path, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert_one_line_error(proc, 2, "no column of image bytes (columns: x, name)")
    assert list(tmp_path.iterdir()) == [path]


def test_a_file_that_is_not_parquet_is_one_line(onnx_model, tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"PAR1 but not really")
    assert_one_line_error(run_cli("classify", path, "-m", onnx_model), 2, "not a readable Parquet file")


def test_a_damaged_row_group_gives_its_rows_errors_and_the_rest_goes_on(samples, onnx_model, tmp_path):
    _, items = samples
    path = write_hub(tmp_path / "d.parquet", items, row_group_size=100)
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(1).column(0)  # the image bytes of rows 100-199
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    summary, rows = _classify(path, "-m", onnx_model, "-o", tmp_path / "p.csv")
    failed = [i for i, r in enumerate(rows) if r["error"]]
    assert failed == list(range(100, 200)), failed[:5]
    assert "row group 1" in rows[100]["error"] and summary["classified"] == len(items) - 100


def _held_at_the_start(cmd: list, deed) -> subprocess.CompletedProcess:
    """Run ``cmd`` held where its inputs are checked and nothing is walked yet (classify.before_engine), do
    ``deed()`` there, let it go on; the finished process, its output read."""
    with Held(cmd, f"{CLASSIFY_BEFORE_ENGINE}:1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as held:
        held.wait()
        deed()
        held.release()
        stdout, stderr = held.proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, held.proc.returncode, stdout, stderr)


@pytest.mark.parametrize("damage", ["truncated", "no image column"])
def test_a_parquet_input_damaged_after_the_check_is_one_error_row_and_the_run_goes_on(samples, onnx_model,
                                                                                       tmp_path, damage):
    """As a damaged tar: one error row ``<file>::``, the other inputs' rows, exit 3 (was: exit 2, no output)."""
    _, items = samples
    bad, good = write_hub(tmp_path / "bad.parquet", items[:40]), write_hub(tmp_path / "good.parquet", items[:40])
    out = tmp_path / "p.csv"

    def deed() -> None:
        if damage == "truncated":
            bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
        else:
            pq.write_table(pa.table({"x": [1, 2]}), bad)

    proc = _held_at_the_start([sys.executable, "-m", "fmnist_onnx", "classify", str(bad), str(good), "-m",
                               str(onnx_model), "-o", str(out), "--workers", "2", "--json"], deed)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    rows = list(read_rows(out))
    assert [r["path"] for r in rows] == [f"{bad}::", *(f"{good}::row/{i}" for i in range(40))]
    why = "not a readable Parquet file" if damage == "truncated" else "no column of image bytes (columns: x)"
    assert why in rows[0]["error"] and all(r["error"] is None for r in rows[1:])
    assert json.loads(proc.stdout)["failed"] == 1 and not [n for n in os.listdir(tmp_path) if "partial" in n]


def test_rows_of_a_parquet_file_damaged_after_the_walk_are_error_rows(samples, tmp_path):
    """A worker that opens the file after the walk listed it (the walk in this process, then a worker's read,
    from a fresh worker's state): its rows are error rows, not an exception that ends the run."""
    from fmnist_onnx.classify import sources

    _, items = samples
    path = write_hub(tmp_path / "t.parquet", items[:100], row_group_size=25)
    chunks = [b.members for b in sources.walk([str(path)], True)]
    assert [len(m) for m in chunks] == [25] * 4
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    got = list(sources.Readers().read(chunks[0]))  # a worker that has not read this file yet
    assert len(got) == 25 and all(isinstance(e, ImageError) for e in got)
    assert str(got[0]).startswith("cannot read the file now: not a readable Parquet file (")
    write_hub(path, items[:30], row_group_size=25)  # replaced by a shorter table: rows 30-99 are gone
    readers = sources.Readers()  # a fresh worker, which reads its chunks in turn
    got = [x for m in chunks for x in readers.read(m)]
    assert [isinstance(x, bytes) for x in got] == [True] * 30 + [False] * 70
    assert str(got[-1]) == "no such row: the file holds 30 rows now"


@pytest.mark.parametrize("metadata", [
    b"[" * 100_000 + b"]" * 100_000,  # json.loads: RecursionError
    json.dumps({"info": {"features": {"label": {"_type": "ClassLabel", "names": [[[[]]]]}}}}).replace(
        "[[[[]]]]", "[" * 100_000 + "]" * 100_000).encode(),
    b"{not json",
])
def test_class_names_in_bad_or_deeply_nested_metadata_count_as_none(samples, onnx_model, tmp_path, metadata):
    _, items = samples
    path = tmp_path / "m.parquet"
    table = pa.table({"image": pa.array([b for _, b, _ in items[::30]], pa.binary()),
                      "label": pa.array([c for _, _, c in items[::30]], pa.int64())})
    pq.write_table(table.replace_schema_metadata({b"huggingface": metadata}), path)
    summary, rows = _classify(path, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert [r["true_label"] for r in rows] == [CLASSES[c] for _, _, c in items[::30]]  # class indices, as without
    assert summary["failed"] == 0


def test_a_uint64_label_of_2_63_or_more_has_no_true_class(samples, onnx_model, tmp_path):
    _, items = samples
    path = tmp_path / "u.parquet"
    labels = [9, 2**63, 2**64 - 1, 10, 3]
    pq.write_table(pa.table({"image": pa.array([b for _, b, _ in items[:5]], pa.binary()),
                             "label": pa.array(labels, pa.uint64())}), path)
    summary, rows = _classify(path, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert [r["true_label"] for r in rows] == [CLASSES[9], None, None, None, CLASSES[3]]
    assert summary["failed"] == 0 and sorted(os.listdir(tmp_path)) == ["p.csv", "p.csv.run.json", "u.parquet"]


def test_null_and_oversized_images_are_error_rows(samples, onnx_model, tmp_path):
    _, items = samples
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"image": pa.array([items[0][1], None, b"not an image"], pa.binary())}), path)
    _, rows = _classify(path, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert rows[0]["error"] is None and "null" in rows[1]["error"] and rows[2]["error"]


def test_a_file_named_like_a_tables_row_gets_a_row_of_its_own(samples, onnx_model, tmp_path):
    _, items = samples
    table = write_hub(tmp_path / "t.parquet", items[:3])
    odd = tmp_path / "t.parquet::row" / "0"  # the very name of the table's first row
    odd.parent.mkdir()
    odd.write_bytes(items[3][1])
    _, rows = _classify(table, odd, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [f"{table}::row/{i}" for i in range(3)] + [f"{tmp_path}/t.parquet\\:\\:row/0"]
    assert all(r["error"] is None for r in rows)


def test_a_loose_file_with_the_separator_in_its_name_is_an_escaped_loose_file(samples, onnx_model, tmp_path):
    _, items = samples
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a::row-1.png").write_bytes(items[0][1])
    _, rows = _classify(tmp_path / "in", "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [str(tmp_path / "in" / "a\\:\\:row-1.png")] and rows[0]["error"] is None


def test_the_report_draws_rows_from_inside_the_table(samples, onnx_model, tmp_path):
    _, items = samples
    table = write_hub(tmp_path / "t.parquet", items)
    _classify(table, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert_report_draws(tmp_path / "p.csv", tmp_path / "r.html")


# ---------------------------------------------------------------------------------------------- --image-column

@pytest.fixture(scope="module")
def folder_labels(samples, onnx_model, tmp_path_factory) -> list[str]:
    """The labels the folder of samples gets, in its walk's (sorted) order: what any table of them must give."""
    folder, _ = samples
    _, rows = _classify(folder, "-m", onnx_model, "-o", tmp_path_factory.mktemp("pq_dir") / "dir.csv")
    return [r["label"] for r in rows]


def write_columns(path: Path, items: list, images: str, image_struct: bool, other: str) -> Path:
    """A table whose images are in column ``images`` (binary, or the Hub's struct) beside another binary
    column ``other`` holding the same images in reverse order (reading it would give other labels), and the
    Hub's label column."""
    data = [b for _, b, _ in items]
    image = pa.array([{"bytes": b, "path": p} for p, b, _ in items]) if image_struct else pa.array(data, pa.binary())
    table = pa.table({other: pa.array(data[::-1], pa.large_binary()), images: image,
                      "label": pa.array([c for _, _, c in items], pa.int64())})
    features = {"label": {"names": HUB_NAMES, "_type": "ClassLabel"}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})}),
                   path, row_group_size=64)
    return path


def assert_error_line(proc: subprocess.CompletedProcess, contains: str) -> str:
    """Exit 2 and one 'Error:' line (after Click's usage lines, for a usage error) that says ``contains``."""
    assert_one_line_error(proc, 2, contains)
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert contains in line
    return line


@pytest.mark.parametrize("images, image_struct, other", [("png", False, "thumb"), ("photo", True, "image")])
def test_image_column_reads_the_named_column(samples, folder_labels, onnx_model, tmp_path, images, image_struct,
                                             other):
    """Two binary columns (or a struct beside a binary 'image' the rule would pick): the named one is read."""
    _, items = samples
    table = write_columns(tmp_path / "t.parquet", items, images, image_struct, other)
    summary, rows = _classify(table, "--image-column", images, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert [r["label"] for r in rows] == folder_labels and summary["failed"] == 0
    assert [r["true_label"] for r in rows] == [CLASSES[c] for _, _, c in items]


def test_several_binary_columns_without_an_image_column_say_to_name_one(samples, onnx_model, tmp_path):
    _, items = samples
    table = write_columns(tmp_path / "t.parquet", items[:5], "png", False, "thumb")
    line = assert_error_line(run_cli("classify", table, "-m", onnx_model, "-o", tmp_path / "p.csv"),
                             "several columns of bytes (thumb, png)")
    assert "--image-column" in line and list(tmp_path.iterdir()) == [table]


def test_a_missing_image_column_names_the_file_and_its_columns(samples, onnx_model, tmp_path):
    _, items = samples
    table = write_columns(tmp_path / "t.parquet", items[:5], "png", False, "thumb")
    proc = run_cli("classify", table, "--image-column", "jpeg", "-m", onnx_model, "-o", tmp_path / "p.csv")
    line = assert_error_line(proc, f"{table}: no column 'jpeg'")
    assert line.endswith("thumb, png, label") and list(tmp_path.iterdir()) == [table]


def test_an_image_column_that_holds_no_bytes_is_one_line(samples, onnx_model, tmp_path):
    _, items = samples
    table = write_columns(tmp_path / "t.parquet", items[:5], "png", False, "thumb")
    proc = run_cli("classify", table, "--image-column", "label", "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert_error_line(proc, "column 'label' (--image-column) is int64, not image bytes")


def test_image_column_without_a_parquet_input_is_a_usage_error(samples, onnx_model, tmp_path):
    folder, _ = samples
    proc = run_cli("classify", folder, "--image-column", "png", "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert_error_line(proc, "--image-column is for Parquet inputs")
    assert "Usage:" in proc.stderr and not (tmp_path / "p.csv").exists()


def test_resume_continues_with_the_image_column_and_refuses_another(samples, folder_labels, onnx_model, tmp_path):
    _, items = samples
    table = write_columns(tmp_path / "t.parquet", items, "png", False, "thumb")
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(table), "--image-column", "png", "-m",
           str(onnx_model), "-o", str(out), "--workers", "1"]
    with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:1", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL) as held:
        held.wait()
        os.killpg(held.proc.pid, signal.SIGKILL)
        held.proc.wait()
    other = run_cli("classify", table, "--image-column", "thumb", "-m", onnx_model, "-o", out, "--resume")
    assert_error_line(other, "--image-column ('png' then, 'thumb' now)")
    summary, rows = _classify(table, "--image-column", "png", "-m", onnx_model, "-o", out, "--resume")
    assert 0 < summary["resumed"] < len(items) and [r["label"] for r in rows] == folder_labels


def test_the_report_draws_rows_from_the_image_column(samples, onnx_model, tmp_path):
    """classify --report, and `report --image-column`, read the images again from the named column."""
    _, items = samples
    table = write_columns(tmp_path / "t.parquet", items, "png", False, "thumb")
    page = tmp_path / "r.html"
    _classify(table, "--image-column", "png", "-m", onnx_model, "-o", tmp_path / "p.csv", "--report", page)
    again = run_cli("report", tmp_path / "p.csv", "--image-column", "png", "-o", tmp_path / "again.html")
    assert again.returncode == 0, again.stderr
    for text in (page.read_text(), (tmp_path / "again.html").read_text()):
        assert "cannot read it now" not in text and text.count("data:image/png") > 20


@pytest.mark.parametrize("dictionary", [True, False])
def test_record_batches_give_each_row_its_own_bytes(tmp_path, monkeypatch, dictionary):
    """Row groups bigger than a batch (CHUNK_BYTES made 4 KB here) read in record batches, dictionaries kept
    encoded or not, rows asked in order, out of order and across groups: each row's bytes, a null's error."""
    from fmnist_onnx.classify.contract import Members
    from fmnist_onnx.classify.sources import parquet
    from fmnist_onnx.images import ImageError

    values = [None if i % 37 == 5 else bytes([i % 251]) * (50 + i % 90) for i in range(300)]
    values[100:110] = [values[99]] * 10  # repeats, which a dictionary holds once
    path = tmp_path / ("d.parquet" if dictionary else "p.parquet")
    pq.write_table(pa.table({"image": pa.array(values, pa.binary())}), path, row_group_size=120,
                   use_dictionary=dictionary)
    monkeypatch.setattr(parquet, "CHUNK_BYTES", 4096)
    for rows in (list(range(300)), [0, 7, 119, 120, 121, 299], [250, 3, 130, 129, 5]):
        got = list(parquet.read(Members("parquet", str(path), [""] * len(rows), rows, [-1] * len(rows))))
        want = [values[r] for r in rows]
        assert [g if isinstance(g, bytes) else None for g in got] == want
        assert all(isinstance(g, ImageError) and "null" in str(g) for g, w in zip(got, want, strict=True)
                   if w is None)


# ---------------------------------------------------------------------------------------------- one big row group

def test_one_row_group_written_by_datasets_gives_the_folders_rows_and_resumes_exactly(samples, folder_labels,
                                                                                      onnx_model, tmp_path):
    """`datasets` writes a split as ONE row group (60,000 rows of the train PNGs: one group): more rows than a
    record batch holds, its chunks read by two workers in turn. Rows, labels and true classes are the folder's;
    killed after its first chunks and resumed, every row once."""
    datasets = pytest.importorskip("datasets", reason="the test extra installs datasets")
    from fmnist_onnx.classify.sources import parquet

    _, items = samples
    times = parquet.BATCH_ROWS // len(items) + 2  # the samples over and over: a group of a few batches
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=HUB_NAMES)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for _, b, _ in items] * times,
                                     "label": [c for _, _, c in items] * times}, features=features)
    path = tmp_path / "train.parquet"
    ds.to_parquet(path)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 1 and meta.num_rows == len(items) * times > parquet.BATCH_ROWS
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(path), "-m", str(onnx_model), "-o", str(out),
           "--workers", "2"]
    with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:2", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL) as held:
        held.wait()
        os.killpg(held.proc.pid, signal.SIGKILL)
        held.proc.wait()
    summary, rows = _classify(path, "-m", onnx_model, "-o", out, "--resume")
    assert 0 < summary["resumed"] < meta.num_rows and summary["failed"] == 0
    assert [r["path"] for r in rows] == [f"{path}::row/{i}" for i in range(meta.num_rows)]
    assert [r["label"] for r in rows] == folder_labels * times
    assert [r["true_label"] for r in rows] == [CLASSES[c] for _, _, c in items] * times


def test_a_worker_reads_a_big_row_group_a_batch_at_a_time(tmp_path, monkeypatch):
    """Two workers' Readers take turns at the chunks of one row group: each holds one record batch of it at a
    time (its first chunk waits for one batch, not the group), and every row of its chunks gets its own bytes,
    a row before the batch held too (read from the group's start again)."""
    from fmnist_onnx.classify.contract import Members
    from fmnist_onnx.classify.sources import parquet

    values = [None if i % 41 == 7 else bytes([i % 251]) * (20 + i % 70) for i in range(1000)]
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"image": pa.array(values, pa.binary())}), path, row_group_size=10_000,
                   use_dictionary=False)
    monkeypatch.setattr(parquet, "BATCH_ROWS", 64)
    workers = [parquet.Reader(), parquet.Reader()]
    chunks = [range(0, 9), range(9, 203), *(range(a, min(1000, a + 97)) for a in range(203, 1000, 97)), [3, 5, 990]]
    for i, rows in enumerate(chunks):
        reader = workers[i % 2]
        got = list(reader.read(Members("parquet", str(path), [""] * len(rows), list(rows), [-1] * len(rows))))
        assert [g if isinstance(g, bytes) else None for g in got] == [values[r] for r in rows]
        held = reader.batches[1]
        assert len(held.values) <= 64 and held.start <= rows[-1] < held.start + len(held.values)
    for reader in workers:
        reader.close()
        assert reader.batches is None and not reader.files
