"""`fmnist-onnx report` and `classify --report`: the HTML page of a real run, opened in a real browser.

The browser is Debian's chromium driven by Playwright (its own browser download is never used). The run:
the 10,000 test PNGs plus a folder with broken files and a product photo, classified for real.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist_onnx import images
from fmnist_onnx.report import CELL_IMAGES, FAILED_LISTED, GALLERY_IMAGES, MAX_BYTES, THUMB_SIDE, draw
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import read_rows
from harness import assert_one_line_error, run_cli

CHROMIUM = Path("/usr/bin/chromium")
needs_browser = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at "
                                   "/usr/bin/chromium (apt-get install chromium); CI installs it")


@pytest.fixture(scope="module")
def broken(tmp_path_factory, test_pngs) -> Path:
    """Files that fail, in a class folder (so the run stays labelled), and a photo that does not."""
    root = tmp_path_factory.mktemp("broken") / "extra"
    shirt = root / "Shirt"
    shirt.mkdir(parents=True)
    good = next((test_pngs / "Shirt").glob("*.png")).read_bytes()
    (shirt / "empty.png").write_bytes(b"")
    (shirt / "text.png").write_bytes(b"I am not a picture\n")
    (shirt / "truncated.png").write_bytes(good[: len(good) // 2])
    os.symlink(root / "nowhere.png", shirt / "dangling.png")
    src = np.asarray(Image.open(next((test_pngs / "Shirt").glob("*.png"))))
    photo = Image.new("RGB", (400, 300), (250, 248, 244))  # a dark garment on a light background, in colour
    photo.paste(Image.fromarray(255 - src).resize((260, 260)).convert("RGB"), (70, 20))
    photo.save(shirt / "photo.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def run(onnx_model, test_pngs, broken, tmp_path_factory) -> dict:
    """classify --report --json over the test split and the broken folder: the table, the page, the summary."""
    d = tmp_path_factory.mktemp("run")
    out, page = d / "preds.csv", d / "report.html"
    proc = run_cli("classify", test_pngs, broken, "-m", onnx_model, "-o", out, "--top-k", "3", "--report", page,
                   "--json")
    assert proc.returncode == 3, proc.stderr  # some files failed
    assert f"report: {page}" in proc.stderr
    rows = list(read_rows(out))
    return {"dir": d, "out": out, "page": page, "summary": json.loads(proc.stdout), "rows": rows}


def cells_of(rows: list[dict]) -> dict[tuple[int, int], set[str]]:
    cells: dict[tuple[int, int], set[str]] = {}
    for r in rows:
        if not r["error"]:
            cells.setdefault((images.true_class(r["path"]), r["index"]), set()).add(r["path"])
    return cells


# ---------------------------------------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium); "
                    "CI installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


def open_page(browser, path: Path, javascript: bool = True):
    """The page, with every console message, page error and request it made recorded."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, java_script_enabled=javascript)
    page = context.new_page()
    page.seen = {"console": [], "errors": [], "requests": []}
    page.on("console", lambda m: page.seen["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: page.seen["errors"].append(str(e)))
    page.on("request", lambda r: page.seen["requests"].append(r.url))
    page.goto(path.as_uri())
    return page


def shown_paths(page) -> list[str]:
    """Paths of the files shown in the matrix's panel now (visible ones only)."""
    return page.locator("#cell-panel figure:visible code.path").all_inner_texts()


@needs_browser
def test_page_opens_clean_and_makes_no_request(browser, run):
    page = open_page(browser, run["page"])
    assert page.seen["errors"] == []
    assert [m for m in page.seen["console"] if m[0] in ("error", "warning")] == []
    # self-contained: the file itself, and data: images; nothing else is even asked for
    assert all(u == run["page"].as_uri() or u.startswith("data:") for u in page.seen["requests"]), \
        [u[:80] for u in page.seen["requests"] if not u.startswith("data:")]
    s = run["summary"]
    glance = page.locator("dl.glance").inner_text()
    assert f"{s['files']:,}" in glance and f"{s['accuracy_pct']:.2f}%" in glance and s["provider"] in glance
    # every figure has its picture and alt text, and the browser decoded every image
    assert page.locator("img:not([alt])").count() == 0
    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
    assert broken == 0
    page.context.close()


@needs_browser
def test_clicking_a_cell_shows_exactly_its_files(browser, run, tmp_path):
    cells = cells_of(run["rows"])
    small = min((k for k, v in cells.items() if k[0] != k[1] and 3 <= len(v) <= CELL_IMAGES),
                key=lambda k: (-len(cells[k]), k))
    big = max(cells, key=lambda k: len(cells[k]))  # a diagonal cell, sampled
    page = open_page(browser, run["page"])
    assert shown_paths(page) == []  # nothing chosen yet
    link = page.locator(f'table.cm a[href="#cell-{small[0]}-{small[1]}"]')
    assert link.inner_text() == str(len(cells[small]))
    link.click()
    assert sorted(shown_paths(page)) == sorted(cells[small])
    assert link.get_attribute("aria-current") == "true"
    captions = page.locator("#cell-panel figure:visible figcaption").all_inner_texts()
    assert all(f"true {CLASSES[small[0]]}, predicted {CLASSES[small[1]]}" in c and "top 3:" in c for c in captions)

    # the keyboard alone: focus another cell, Enter; the sample of a big cell says how many it leaves out
    page.locator(f'table.cm a[href="#cell-{big[0]}-{big[1]}"]').focus()
    page.keyboard.press("Enter")
    shown = shown_paths(page)
    assert len(shown) == CELL_IMAGES and set(shown) <= cells[big]
    assert f"{len(cells[big]) - CELL_IMAGES:,} more not in this report" in page.locator("#cell-panel").inner_text()
    assert link.get_attribute("aria-current") is None

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size[0] == 1440 and im.size[1] > 2000
    page.context.close()


@needs_browser
def test_failed_files_are_listed_with_their_errors(browser, run):
    failed = {r["path"]: r["error"] for r in run["rows"] if r["error"]}
    assert len(failed) == 4
    page = open_page(browser, run["page"])
    assert page.locator("#failed h2").inner_text() == "Failed files (4)"
    table = page.locator("table.failed tbody tr")
    listed = {table.nth(i).locator("td").nth(0).inner_text(): table.nth(i).locator("td").nth(1).inner_text()
              for i in range(table.count())}
    assert listed == failed
    assert any("dangling symbolic link" == e for e in listed.values())
    page.context.close()


@needs_browser
def test_without_javascript_the_tables_read_and_a_cell_link_still_shows_its_files(browser, run):
    cells = cells_of(run["rows"])
    t, p = min((k for k, v in cells.items() if k[0] != k[1] and len(v) <= CELL_IMAGES), key=lambda k: k)
    page = open_page(browser, run["page"], javascript=False)
    assert page.locator("table.cm tbody tr").count() == 10
    assert page.locator("#per-class tbody tr").count() == 10
    assert page.locator("table.failed tbody tr").count() == 4
    assert shown_paths(page) == []
    page.locator(f'table.cm a[href="#cell-{t}-{p}"]').click()  # plain link + CSS :target
    assert sorted(shown_paths(page)) == sorted(cells[t, p])
    page.context.close()


# ---------------------------------------------------------------------------------------------- the page itself

def test_the_page_shows_the_run_the_model_and_the_galleries(run, onnx_model):
    from fmnist_onnx.runtime import open_session

    text = run["page"].read_text(encoding="utf-8")
    meta = open_session(onnx_model, "cpu").metadata
    assert meta["weights_sha256"] in text and f"{meta['test_accuracy']}%" in text
    assert "T-shirt/top, Trouser, Pullover" in text
    rows = [r for r in run["rows"] if not r["error"]]
    # the least confident predictions are exactly the lowest scores of the table
    lowest = sorted(rows, key=lambda r: r["score"])[:GALLERY_IMAGES]
    section = text[text.index('id="unsure"'):text.index('id="failed"')]
    for r in lowest[:GALLERY_IMAGES - 5]:  # (ties at the boundary may go either way)
        assert r["path"] in section
    wrong = [r for r in rows if images.true_class(r["path"]) != r["index"]]
    assert f"{GALLERY_IMAGES} of {len(wrong):,} misclassified files" in text


def test_a_file_is_drawn_as_the_model_saw_it_beside_its_original(broken, tmp_path):
    def decode(uri: str) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))

    photo = str(broken / "Shirt" / "photo.jpg")
    d = draw(photo, "auto")
    seen, original = decode(d.seen), decode(d.original)
    assert (seen.size, seen.mode) == ((28, 28), "L")
    # --invert auto turned the dark garment on white into Fashion-MNIST's light on dark, as classify did
    expected = images.load_bytes(Path(photo).read_bytes(), "auto")
    np.testing.assert_array_equal(np.asarray(seen), expected)
    assert np.asarray(seen)[0, 0] < 20
    assert original.mode == "RGB" and max(original.size) <= THUMB_SIDE and d.size == (400, 300)
    assert np.asarray(original)[0, 0].mean() > 230  # the original keeps its light background
    assert np.asarray(decode(draw(photo, "no").seen))[0, 0] > 230
    # a photo taken sideways (EXIF orientation 6): its original is drawn upright, as the model saw it
    a = np.full((300, 400, 3), 250, np.uint8)
    a[40:260, 20:140] = 10
    sideways = Image.fromarray(a)
    exif = sideways.getexif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "sideways.jpg", exif=exif.tobytes())
    d = draw(str(tmp_path / "sideways.jpg"), "auto")
    assert decode(d.original).size == (72, 96)  # portrait, like the upright photo
    np.testing.assert_array_equal(np.asarray(decode(d.seen)),
                                  images.load_bytes((tmp_path / "sideways.jpg").read_bytes(), "auto"))
    gone = draw(str(tmp_path / "gone.png"), "auto")
    assert gone.seen is None and gone.note == "cannot read it now: file not found"


def test_report_command_gives_the_same_page_as_classify_report(run, onnx_model):
    summary = run["dir"] / "run.json"
    summary.write_text(json.dumps(run["summary"]))
    again = run["dir"] / "again.html"
    proc = run_cli("report", run["out"], "-o", again, "-m", onnx_model, "--summary", summary, check=True)
    assert f"wrote {again}: 10,005 rows" in proc.stdout
    assert again.read_bytes() == run["page"].read_bytes()


def test_same_page_from_csv_and_parquet(run, onnx_model, test_pngs, broken, tmp_path):
    pytest.importorskip("pyarrow")
    parquet = tmp_path / "preds.parquet"
    proc = run_cli("classify", test_pngs, broken, "-m", onnx_model, "-o", parquet, "--top-k", "3", "-q")
    assert proc.returncode == 3, proc.stderr
    pages = {}
    for table in (run["out"], parquet):
        page = tmp_path / f"{table.suffix[1:]}.html"
        run_cli("report", table, "-o", page, "-m", onnx_model, check=True)
        pages[table] = page.read_text(encoding="utf-8").replace(str(table), "TABLE").replace(table.name, "TABLE")
    assert pages[run["out"]] == pages[parquet]
    assert "not recorded in the table" in pages[parquet]  # no --summary: the table has no provider or speed


def test_unlabelled_folder_has_no_matrix_but_a_gallery(onnx_model, test_pngs, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for src in sorted((test_pngs / "Bag").glob("*.png"))[:30]:
        (flat / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "flat.jsonl"
    run_cli("classify", flat, "-m", onnx_model, "-o", out, "-q", "--report", tmp_path / "flat.html", check=True)
    text = (tmp_path / "flat.html").read_text(encoding="utf-8")
    assert 'id="confusion"' not in text and "no accuracy" in text
    assert text.count("<figure>") == 30  # the least confident gallery holds all 30
    assert "Failed files (0)" in text


# ---------------------------------------------------------------------------------------------- bounds

def _big_table(table: Path, n: int, base: list[str], links: Path, tmp_path: Path) -> None:
    """n rows of unique paths (base files reached through many symbolic links to their folder), random
    predictions and scores, and a failed row in every 200 with one of 70 messages."""
    rng = np.random.default_rng(n)
    pred, score = rng.integers(0, 10, n), rng.uniform(0.1, 1, n)
    with open(table, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "index", "score", "error"])
        for i in range(n):
            if i % 200 == 0:
                w.writerow([f"{tmp_path}/failed/{i}.png", "", "", "", f"cannot decode: error {i // 200 % 70}"])
            else:
                link, k = divmod(i, len(base))
                w.writerow([f"{links}/L{link}/{base[k]}", CLASSES[pred[i]], int(pred[i]), f"{score[i]:.6g}", ""])


def _report_process(table: Path, page: Path) -> tuple[float, float, str]:
    """`fmnist-onnx report` as a process: seconds, peak memory (MiB, from the kernel) and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_onnx", "report", str(table), "-o", str(page)],
                            cwd=table.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, err.decode()
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, out.decode()


@pytest.mark.slow
def test_a_big_table_stays_under_the_size_bound_in_flat_memory(test_pngs, tmp_path):
    """Every cell and gallery full, colour photos, files gone since the run, 2,000 failed files with 70
    messages: the page stays under 20 MB, and memory does not grow with the table (20,000 rows against
    400,000: kept in memory, the rows would add about 200 MB)."""
    folder = tmp_path / "files"
    for c in CLASSES:
        (folder / c.replace("/", "-")).mkdir(parents=True)
    base = [str(p.relative_to(test_pngs)) for p in sorted(test_pngs.rglob("*.png"))[::20]]  # 500, every class
    rng = np.random.default_rng(0)
    for rel in base:
        os.symlink(test_pngs / rel, folder / rel)
    for i in range(40):  # busy colour photos: their thumbnails are as big as thumbnails get
        rel = f"{CLASSES[i % 10].replace('/', '-')}/photo{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / rel, quality=95)
        base.append(rel)
    base += [f"Coat/gone{i}.png" for i in range(20)]
    links = tmp_path / "links"
    links.mkdir()
    for j in range(800):
        os.symlink(folder, links / f"L{j}")
    runs = {}
    for n in (20_000, 400_000):
        table, page = tmp_path / f"t{n}.csv", tmp_path / f"t{n}.html"
        _big_table(table, n, base, links, tmp_path)
        runs[n] = _report_process(table, page)
    seconds, peak, out = runs[400_000]
    size = page.stat().st_size
    assert size < MAX_BYTES, size
    assert runs[400_000][1] - runs[20_000][1] < 40, runs
    text = page.read_text(encoding="utf-8")
    assert text.count('<section class="cell"') == 100
    assert text.count("<figure>") == 100 * CELL_IMAGES + 2 * GALLERY_IMAGES
    assert re.search(r"\d[\d,]* more not in this report", text)
    assert "cannot read it now: file not found" in text  # a file gone since the run: said, not a crash
    assert "The original image, 640x480 pixels" in text
    assert f"The first {FAILED_LISTED:,} of 2,000" in text
    kinds = set(re.findall(r"cannot decode: error (\d+)</th>", text))
    assert len(kinds) == 50 and "other messages" in text  # 50 messages counted, the rest together
    print(f"400,000 rows: {size / 1e6:.1f} MB in {seconds:.1f} s, peak {peak:.0f} MiB; {out.strip()}")


# ---------------------------------------------------------------------------------------------- user mistakes

@pytest.mark.parametrize("case", ["missing", "partial", "not a table", "foreign csv", "onto itself", "no folder"])
def test_report_mistakes_are_one_line(case, run, tmp_path):
    args = {"missing": [tmp_path / "nope.csv"],
            "partial": [tmp_path / "preds.csv.partial"],
            "not a table": [tmp_path / "notes.txt"],
            "foreign csv": [tmp_path / "other.csv"],
            "onto itself": [run["out"], "-o", run["out"]],
            "no folder": [run["out"], "-o", tmp_path / "nowhere" / "r.html"]}[case]
    (tmp_path / "preds.csv.partial").write_text("path,label,index,score,error\n")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    contains = {"missing": "no such file", "partial": "interrupted run", "not a table": "not a classify output",
                "foreign csv": "not a classify output", "onto itself": "is also an input of this command",
                "no folder": "does not exist"}[case]
    before = run["out"].read_bytes()
    assert_one_line_error(run_cli("report", *args), 2, contains)
    assert run["out"].read_bytes() == before


def test_classify_report_mistakes_are_refused_before_the_run(onnx_model, test_pngs, tmp_path):
    assert_one_line_error(run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "--report", tmp_path / "r.html"),
                          2, "--report is made from the output table")
    out = tmp_path / "p.csv"
    proc = run_cli("classify", test_pngs / "Bag", "-m", onnx_model, "-o", out, "--report", tmp_path / "no" / "r.html")
    assert_one_line_error(proc, 2, "does not exist")
    assert not out.exists() and not out.with_name("p.csv.partial").exists()  # refused before any work


# ---------------------------------------------------------------------------------------------- archives

def _archives(test_pngs: Path, where: Path) -> dict[str, dict[str, bytes]]:
    """Five archives of 12 test PNGs each, the same member names (img/0.png ... img/11.png) in every one but
    other images in each, written by Python's tarfile (.tar.gz), GNU tar (.tar.bz2, .tar), Python's zipfile and
    Info-ZIP's zip where installed: {archive: {member: bytes}}."""
    import tarfile
    import zipfile

    pngs = [p.read_bytes() for c in CLASSES for p in sorted((test_pngs / c.replace("/", "-")).glob("*.png"))[:6]]
    out: dict[str, dict[str, bytes]] = {}
    for k, name in enumerate(["a.tar.gz", "b.tar.bz2", "c.tar", "d.zip", "e.zip"]):
        src = where / f"src{k}"
        (src / "img").mkdir(parents=True)
        members = {f"img/{j}.png": pngs[12 * k + j] for j in range(12)}
        for m, data in members.items():
            (src / m).write_bytes(data)
        dst = where / name
        if name.endswith(".tar.gz"):
            with tarfile.open(dst, "w:gz") as tf:
                tf.add(src / "img", arcname="img")
        elif name.endswith(".tar.bz2") or name.endswith(".tar"):
            subprocess.run(["tar", "-cjf" if name.endswith("bz2") else "-cf", dst, "-C", src, "img"], check=True)
        elif name == "e.zip" and shutil.which("zip"):
            subprocess.run(["zip", "-q", "-r", dst, "img"], cwd=src, check=True)
        else:
            with zipfile.ZipFile(dst, "w") as zf:
                for m, data in members.items():
                    zf.writestr(m, data)
        out[str(dst)] = members
    return out


def test_the_report_reads_each_archive_once_and_draws_each_row_its_own_member(test_pngs, tmp_path, monkeypatch):
    """Rows alternating over a .tar.gz, a .tar.bz2, a .tar and two zips: each archive is opened once for the
    page (before: a compressed tar was streamed from its start for every figure, 16 s against 0.9 s for the
    same .tar over 2,000 rows, and a zip listed again at every switch), and each figure shows its own row's
    member, byte for byte (the members' names repeat across the archives; their images do not)."""
    from fmnist_onnx import archives
    from fmnist_onnx.report import build_report

    held = _archives(test_pngs, tmp_path)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "index", "score", "error", "true_label"])
        for j in range(12):
            for k, archive in enumerate(held):
                truth = (12 * k + j) // 6
                w.writerow([f"{archive}::img/{j}.png", CLASSES[truth], truth, f"{0.5 + (12 * k + j) / 200:.3f}", "",
                            CLASSES[truth]])
    opened: list[str] = []
    for name in ("stream_tar", "index_tar", "index_zip"):  # the archives' own readers, counted, not replaced
        real = getattr(archives, name)
        monkeypatch.setattr(archives, name, lambda path, real=real: (opened.append(path), real(path))[1])
    result = build_report(tmp_path / "t.csv", tmp_path / "r.html")
    assert sorted(opened) == sorted(held)  # each once
    text = (tmp_path / "r.html").read_text()
    figures = re.findall(r'<img class="orig[^"]*" src="data:image/png;base64,([^"]+)"[^>]*></div><figcaption>'
                         r'<code class="path">([^<]+)</code>', text)
    assert result.figures == len(figures) >= 60 and "cannot read it now" not in text
    for data, path in figures:
        archive, _, member = path.partition("::")
        assert base64.b64decode(data) == held[archive][member], path
