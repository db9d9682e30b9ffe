"""`fmnist-onnx report` on crafted input, as an attacker or a careless user would give it: tables and summaries
of the wrong types, names that carry script or deceive, huge originals, and outputs that are its own inputs.

Every case runs the real CLI as a process on real files. No trained model is needed: the tables are written
here, naming real PNGs, and the model is a small valid ONNX classifier made with the onnx package.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist_onnx.spec import CLASSES
from harness import assert_one_line_error, foreign_model, run_cli

SCRIPT = "<script>alert(1)</script>"
IMG_ATTR = '"><img src=x onerror=alert(1)>'
COLUMNS = ["path", "label", "index", "score", "error"]


def report(*args, cwd: Path):
    """`fmnist-onnx report` run in ``cwd`` (so that no artifacts/model.onnx of the checkout is picked up)."""
    return run_cli("report", *args, cwd=cwd)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three real 28x28 PNGs in class folders, and a valid table of them (preds.csv) with one failed row."""
    rng = np.random.default_rng(0)
    for i, cls in enumerate(("Bag", "Coat", "Bag")):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    write_csv(tmp_path / "preds.csv", [["Bag/0.png", "Bag", 8, 0.9, ""], ["Coat/1.png", "Bag", 8, 0.6, ""],
                                       ["Bag/2.png", "Coat", 4, 0.7, ""], ["Bag/3.png", "", "", "", "empty file"]])
    return tmp_path


def write_csv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def row(path="Bag/0.png", label="Bag", index=8, score=0.9, error=None) -> str:
    return json.dumps({"path": path, "label": label, "index": index, "score": score, "error": error})


# ---------------------------------------------------------------------------------------------- tables

# (lines, row, what the message quotes). The row is named as "row N" or "line N" (table.py's reader checks
# rows for classify and report alike, and names lines): either way one line naming the file and the row.
JSONL_CASES = {
    "a row that is a list": ([row(), '["Bag/1.png", "Bag", 8, 0.5, null]'], 2, None),
    "a numeric path": ([row(path=12345)], 1, None),
    "index eight": ([row(index="eight")], 1, "'eight'"),
    "index 99": ([row(index=99)], 1, "99"),
    "index -1": ([row(), row(label="Ankle boot", index=-1)], 2, "-1"),
    "index true": ([row(index=True)], 1, "True"),
    "score high": ([row(score="high")], 1, "'high'"),
    "score 1.5": ([row(score=1.5)], 1, "1.5"),
    "score NaN": ([row(score=float("nan"))], 1, "nan"),
    "label of another class": ([row(label="Coat")], 1, "'Coat'"),
    "an error that is an object": ([row(label=None, index=None, score=None, error={"a": 1})], 1, None),
    "a failed row with a class": ([row(error="bad")], 1, "label"),
    "nested 30,000 deep": ([row(), "[" * 30_000 + "]" * 30_000, row()], 2, None),
}


def assert_names_row(proc, name: str, rows: str, quotes: str | None) -> None:
    """One line, exit 2, naming the file and the row (``rows``: a regex of the words that may name it)."""
    assert_one_line_error(proc, 2, quotes or "")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(rf"{re.escape(name)}:? ({rows})\b", proc.stderr), proc.stderr


@pytest.mark.parametrize("case", JSONL_CASES)
def test_a_crafted_jsonl_table_is_one_line_naming_file_and_row(case, folder):
    lines, n, quotes = JSONL_CASES[case]
    write_jsonl(folder / "t.jsonl", lines)
    assert_names_row(report("t.jsonl", "-o", "r.html", cwd=folder), "t.jsonl", f"row {n}|line {n}", quotes)
    assert not (folder / "r.html").exists()


def test_a_jsonl_table_whose_first_line_is_nested_30000_deep_is_one_line(folder):
    write_jsonl(folder / "t.jsonl", ['{"path": ' + "[" * 30_000 + "]" * 30_000 + "}"])
    assert_one_line_error(report("t.jsonl", "-o", "r.html", cwd=folder), 2, "t.jsonl")


CSV_CASES = {"index eight": (["Bag/0.png", "Bag", "eight", "0.9", ""], "'eight'"),
             "index 99": (["Bag/0.png", "Bag", "99", "0.9", ""], "99"),
             "index -1": (["Bag/0.png", "Ankle boot", "-1", "0.9", ""], "-1"),
             "score high": (["Bag/0.png", "Bag", "8", "high", ""], "'high'"),
             "score inf": (["Bag/0.png", "Bag", "8", "inf", ""], "inf"),
             "no index": (["Bag/0.png", "Bag", "", "0.9", ""], "None")}


@pytest.mark.parametrize("case", CSV_CASES)
def test_a_crafted_csv_table_is_one_line_naming_file_and_row(case, folder):
    fields, quotes = CSV_CASES[case]
    write_csv(folder / "t.csv", [["Coat/1.png", "Bag", "8", "0.5", ""], fields])
    # the second row: row 2 of the table, line 3 of the file
    assert_names_row(report("t.csv", "-o", "r.html", cwd=folder), "t.csv", "row 2|line 3", quotes)
    assert not (folder / "r.html").exists()


def test_a_parquet_table_with_a_numeric_path_column_is_one_line(folder):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"path": [1, 2], "label": ["Bag", "Bag"], "index": [8, 8], "score": [0.5, 0.5],
                      "error": pa.array([None, None], pa.string())})
    pq.write_table(table, folder / "t.parquet")
    assert_names_row(report("t.parquet", "-o", "r.html", cwd=folder), "t.parquet", "row 1", None)


def test_a_parquet_table_with_an_index_out_of_range_is_one_line(folder):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"path": ["Bag/0.png"], "label": ["Bag"], "index": [-1], "score": [0.5],
                      "error": pa.array([None], pa.string())})
    pq.write_table(table, folder / "t.parquet")
    assert_names_row(report("t.parquet", "-o", "r.html", cwd=folder), "t.parquet", "row 1", "-1")


def test_a_valid_table_gives_its_page(folder):
    proc = report("preds.csv", "-o", "r.html", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "4 rows" in proc.stdout and "Failed files (1)" in (folder / "r.html").read_text()


# ---------------------------------------------------------------------------------------------- summaries

def summary(**changes) -> dict:
    s = {"output": "preds.csv", "format": "csv", "provider": "CPUExecutionProvider", "workers": 2,
         "decoder": "pillow", "files": 4, "classified": 3, "failed": 1, "skipped": 0, "resumed": 0, "seconds": 0.5,
         "images_per_s": 8.0, "accuracy_pct": 66.7, "per_class": None, "confusion_png": None, "failures": [],
         "already_complete": False}
    s.update(changes)
    return {k: v for k, v in s.items() if v is not ...}


SUMMARY_CASES = {
    "workers holding script": (json.dumps(summary(workers=SCRIPT)), "field workers must be a whole number"),
    "workers true": (json.dumps(summary(workers=True)), "field workers must be a whole number"),
    "no provider": (json.dumps(summary(provider=...)), "no field provider"),
    "seconds as text": (json.dumps(summary(seconds="fast")), "field seconds must be a number"),
    "speed NaN": (json.dumps(summary(images_per_s=float("nan"))), "field images_per_s must be a number"),
    "failures not a list": (json.dumps(summary(failures="none")), "field failures must be a list of objects"),
    "a list": ("[1, 2, 3]", "it is a list, not a JSON object"),
    "nested 30,000 deep": ("[" * 30_000 + "]" * 30_000, "JSON nested too deeply"),
    "nested object 30,000 deep": ('{"a":' * 30_000 + "1" + "}" * 30_000, "JSON nested too deeply"),
    "not JSON": ("provider: cpu", "not JSON"),
}


@pytest.mark.parametrize("case", SUMMARY_CASES)
def test_a_crafted_summary_is_one_line(case, folder):
    text, message = SUMMARY_CASES[case]
    (folder / "run.json").write_text(text)
    proc = report("preds.csv", "-o", "r.html", "--summary", "run.json", cwd=folder)
    assert_one_line_error(proc, 2, message)
    assert "--summary run.json" in proc.stderr
    assert not (folder / "r.html").exists()


def test_a_summary_with_script_in_its_text_fields_is_shown_as_text(folder):
    (folder / "run.json").write_text(json.dumps(summary(provider=SCRIPT, decoder=IMG_ATTR)))
    proc = report("preds.csv", "-o", "r.html", "--summary", "run.json", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    page = (folder / "r.html").read_text()
    assert SCRIPT not in page and IMG_ATTR not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script>") == 1 and "'unsafe-inline'; script-src 'sha256-" in page.replace("&#39;", "'")


# ---------------------------------------------------------------------------------------------- names

def test_control_and_bidirectional_characters_in_names_are_shown_as_escapes(folder):
    deceiving = "Bag/cat_\u202efdp.png"  # reads as cat_gnp.pdf where the override is obeyed
    (folder / deceiving).write_bytes((folder / "Bag/0.png").read_bytes())
    write_csv(folder / "t.csv", [[deceiving, "Bag", 8, 0.9, ""], ["Bag/\x1b]0;owned\x07.png", "", "", "", "x\u2066y"]])
    assert report("t.csv", "-o", "r.html", cwd=folder).returncode == 0
    page = (folder / "r.html").read_text()
    assert "\u202e" not in page and "\x1b" not in page and "\u2066" not in page
    assert "cat_\\u202efdp.png" in page and "Bag/\\x1b]0;owned\\x07.png" in page and "x\\u2066y" in page


def test_lone_surrogates_in_jsonl_paths_are_rows_shown_as_escapes(folder):
    # json.dumps writes them as \ud800 escapes, which json.loads gives back as lone surrogates: no UTF-8 for
    # them, and only \udc80-\udcff stand for bytes (as os.fsdecode keeps a name that is not UTF-8)
    write_jsonl(folder / "t.jsonl", [row(), row(path="Bag/\ud800.png"), row(path="Coat/x\udfff\ud800.png", score=0.5),
                                     row(path="Bag/\udcff.png", score=0.7),
                                     row(path="\ud83d.png", label=None, index=None, score=None, error="bad")])
    proc = report("t.jsonl", "-o", "r.html", cwd=folder)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "5 rows" in proc.stdout, proc.stdout
    page = (folder / "r.html").read_text()
    for shown in ("Bag/\\ud800.png", "Coat/x\\udfff\\ud800.png", "Bag/\\xff.png", "\\ud83d.png"):
        assert shown in page, shown


# ---------------------------------------------------------------------------------------------- bounded cost

def test_rows_naming_one_huge_original_decode_it_once(tmp_path):
    """2,000 rows naming one 64-megapixel colour PNG (before: each of its 296 figures decoded it again, 226 s on
    two cores): the file is read and decoded once for the whole page."""
    (tmp_path / "Bag").mkdir()
    big = np.zeros((8000, 8000, 3), np.uint8)
    big[2000:6000, 2000:6000] = (200, 10, 10)
    Image.fromarray(big).save(tmp_path / "Bag" / "big.png", compress_level=1)
    del big
    rng = np.random.default_rng(1)
    picks = rng.integers(0, 10, 2000)
    write_csv(tmp_path / "t.csv", [["Bag/big.png", CLASSES[k], k, f"{s:.4f}", ""]
                                   for k, s in zip(picks, rng.uniform(0, 1, 2000), strict=True)])
    t0 = time.perf_counter()
    proc = run_cli("-v", "report", "t.csv", "-o", "r.html", cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "296 figures of 1 files (each read and decoded once)" in proc.stderr
    assert seconds < 60, seconds  # about 2 s here
    assert "The original image" not in (tmp_path / "r.html").read_text()  # too big to thumbnail: left out


def test_a_cut_archive_draws_what_lies_before_the_cut_and_says_why_for_the_rest(tmp_path):
    """A .tar.gz cut in half (Python's tarfile, then truncated) and a zip, read for the page in one pass each:
    the members before the cut are drawn, the rest and a member the zip lacks say why in their place, and the
    page is written."""
    import tarfile
    import zipfile

    rng = np.random.default_rng(2)
    (tmp_path / "img").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    with tarfile.open(tmp_path / "whole.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "img", arcname="img")
    whole = (tmp_path / "whole.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.write(tmp_path / "img" / "0.png", "img/0.png")
    paths = [f"cut.tar.gz::img/{i}.png" for i in range(40)] + ["z.zip::img/0.png", "z.zip::img/nope.png"]
    write_csv(tmp_path / "t.csv", [[p, "Bag", 8, f"{0.5 + i / 100:.2f}", ""] for i, p in enumerate(paths)])
    proc = report("t.csv", "-o", "r.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    figures = {path: figure for figure, path in re.findall(r'<figure>(.*?<code class="path">([^<]+)</code>.*?)'
                                                           r'</figure>', (tmp_path / "r.html").read_text(), re.S)}
    assert sorted(figures) == sorted(paths)
    drawn = {p for p in paths if "data:image/png" in figures[p]}
    assert 0 < len(drawn & set(paths[:40])) < 40 and "z.zip::img/0.png" in drawn
    for p in set(paths[:40]) - drawn:
        assert "cannot read it now: cannot read it from cut.tar.gz: compressed data broken" in figures[p]
    assert "cannot read it now: no member &#39;img/nope.png&#39; in the archive" in figures["z.zip::img/nope.png"]


# ---------------------------------------------------------------------------------------------- write policy

@pytest.fixture
def model(tmp_path) -> Path:
    """A valid Fashion-MNIST-shaped ONNX classifier (zero weights), made without training."""
    return foreign_model(tmp_path / "model.onnx", ["batch", 1, 28, 28], 1, 10)


def test_report_onto_its_model_is_refused_even_with_overwrite(folder, model):
    before = model.read_bytes()
    proc = report("preds.csv", "-m", "model.onnx", "-o", "model.onnx", "--overwrite", cwd=folder)
    assert_one_line_error(proc, 2, "is also an input of this command")
    assert model.read_bytes() == before


@pytest.mark.parametrize("target", ["preds.csv", "run.json", "preds.confusion.png", "Bag/0.png"])
def test_report_onto_another_input_is_refused_even_with_overwrite(target, folder):
    (folder / "run.json").write_text(json.dumps(summary()))
    (folder / "preds.confusion.png").write_bytes((folder / "Bag/0.png").read_bytes())
    before = (folder / target).read_bytes()
    proc = report("preds.csv", "--summary", "run.json", "-o", target, "--overwrite", cwd=folder)
    assert_one_line_error(proc, 2, "is also an input of this command")
    assert (folder / target).read_bytes() == before


def test_an_existing_report_is_replaced_only_with_overwrite(folder):
    (folder / "preds.report.html").write_text("mine")
    assert_one_line_error(report("preds.csv", cwd=folder), 2, "preds.report.html exists; use --overwrite")
    assert (folder / "preds.report.html").read_text() == "mine"
    assert report("preds.csv", "--overwrite", cwd=folder).returncode == 0
    assert (folder / "preds.report.html").read_text().startswith("<!doctype html>")


def test_a_symlinked_report_is_replaced_as_a_link_its_target_unchanged(folder):
    (folder / "notes.txt").write_text("my notes")
    os.symlink("notes.txt", folder / "r.html")
    assert_one_line_error(report("preds.csv", "-o", "r.html", cwd=folder), 2, "exists; use --overwrite")
    assert report("preds.csv", "-o", "r.html", "--overwrite", cwd=folder).returncode == 0
    assert not (folder / "r.html").is_symlink() and (folder / "r.html").read_text().startswith("<!doctype html>")
    assert (folder / "notes.txt").read_text() == "my notes"


def test_a_link_to_an_image_the_table_names_is_refused(folder):
    os.symlink("Bag/0.png", folder / "r.html")
    before = (folder / "Bag/0.png").read_bytes()
    proc = report("preds.csv", "-o", "r.html", "--overwrite", cwd=folder)
    assert_one_line_error(proc, 2, "is also an input of this command")
    assert (folder / "Bag/0.png").read_bytes() == before


@pytest.mark.parametrize("case", ["the model", "an input file", "the output", "the journal", "the run record",
                                  "the lock", "existing"])
def test_classify_report_onto_an_input_or_existing_file_is_refused_before_the_run(case, folder, model):
    (folder / "old.html").write_text("old")
    target = {"the model": model, "an input file": folder / "Bag/0.png", "the output": folder / "out.csv",
              "the journal": folder / "out.csv.partial", "the run record": folder / "out.csv.run.json",
              "the lock": folder / "out.csv.lock", "existing": folder / "old.html"}[case]
    before = target.read_bytes() if target.exists() else None
    flags = [] if case == "existing" else ["--overwrite"]
    proc = run_cli("classify", folder / "Bag" / "0.png", folder / "Coat", "-m", model, "-o", folder / "out.csv",
                   "--report", target, *flags, cwd=folder)
    assert_one_line_error(proc, 2, target.name)
    assert (target.read_bytes() if target.exists() else None) == before
    assert not (folder / "out.csv").exists() and not (folder / "out.csv.partial").exists()  # before any work


# ---------------------------------------------------------------------------------------------- in Chromium

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright (as tests/test_report.py runs it; its own browser download unused)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


def crafted_model(path: Path) -> Path:
    """The small model, with script in its metadata keys and values."""
    import onnx

    foreign_model(path, ["batch", 1, 28, 28], 1, 10)
    m = onnx.load(str(path))
    for key, value in ((SCRIPT, IMG_ATTR), ("classes", json.dumps([SCRIPT, IMG_ATTR])), ("test_accuracy", SCRIPT),
                       ("note\u202e", "\x1b]0;title\x07")):
        m.metadata_props.add(key=key, value=value)
    onnx.save(m, str(path))
    return path


def test_a_crafted_run_opens_in_chromium_with_no_dialog_and_no_console_error(browser, tmp_path):
    """Names, errors, summary fields, model metadata and the table's own name, each crafted to inject script:
    all shown as text; the page's own script runs (its hash is allowed) and nothing else does."""
    png = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    names = [f"Bag/{IMG_ATTR}.png", "Bag/<img src=x onerror=alert(1)>.png", "Coat/<script>alert(1)</script>.png",
             "Coat/cat_\u202efdp.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        png.save(tmp_path / name)
    table = write_csv(tmp_path / "<svg onload=alert(1)>.csv",
                      [[n, "Bag", 8, 0.4 + 0.1 * i, ""] for i, n in enumerate(names)]
                      + [["javascript:alert(1)", "", "", "", SCRIPT], [SCRIPT + ".png", "", "", "", IMG_ATTR]])
    (tmp_path / "run.json").write_text(json.dumps(summary(provider=SCRIPT, decoder=IMG_ATTR)))
    crafted_model(tmp_path / "model.onnx")
    proc = report(table.name, "-m", "model.onnx", "--summary", "run.json", "-o", "r.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    context = browser.new_context()
    page = context.new_page()
    seen: dict[str, list] = {"dialogs": [], "console": [], "errors": []}
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("console", lambda m: seen["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.goto((tmp_path / "r.html").as_uri())
    page.locator('table.cm a[href="#cell-4-8"]').click()  # the page's script at work on crafted figures
    assert page.locator("#cell-panel figure:visible").count() == 2
    assert seen == {"dialogs": [], "console": [], "errors": []}
    assert page.evaluate("document.documentElement.classList.contains('js')")  # its own script ran
    assert page.evaluate("document.scripts.length") == 1
    assert page.evaluate("[...document.querySelectorAll('*')].filter(e => e.localName === 'svg' || "
                         "[...e.attributes].some(a => a.name.startsWith('on'))).length") == 0
    text = page.locator("body").inner_text()
    assert SCRIPT in text and IMG_ATTR in text and "cat_\\u202efdp.png" in text and "note\\u202e" in text
    assert page.title() == "<svg onload=alert(1)>.csv: classify report"
    context.close()
