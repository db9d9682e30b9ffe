"""report: one classify run as a self-contained HTML page (images embedded, no network, no server).

Made from the output table (any format, read streaming with sinks.read_rows) plus, when there is one, what
the run's summary knows that the table does not (provider, speed, skipped files). One pass over the rows
keeps counts, the confusion matrix and bounded samples:
- per matrix cell, the CELL_IMAGES files of largest path hash: a uniform sample that does not depend on the
  row order (the Ray engine writes rows as they are done: its table gives the same samples);
- the GALLERY_IMAGES least confident predictions, and (labelled folders) the GALLERY_IMAGES most confident
  mistakes, with heaps;
- the first FAILED_LISTED failed files, and their errors counted by message.
Only the sampled files are read back from disk, to draw them as the model saw them (28x28 after inversion,
with the run's --invert) beside a thumbnail of the original. So the page stays small whatever the number of
rows: at most 100*CELL_IMAGES + 2*GALLERY_IMAGES figures of at most ~7 kB each (the thumbnail is capped at
THUMB_MAX_BYTES, the 28x28 view is under 1 kB, paths and errors are cut to a few hundred characters): under
16 MB in the worst case, within MAX_BYTES.

The page is plain HTML and CSS first: the summary and every table read without JavaScript, and a matrix cell
is a link to its images (shown by CSS :target). A small script only keeps the page from jumping, marks the
chosen cell, and says what is shown. A Content-Security-Policy forbids any request but data: images.
No torch here.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import heapq
import html
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.classify import Tally
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import atomic_write
from fmnist_onnx.sinks import JOURNAL_SUFFIX, read_rows
from fmnist_onnx.spec import CLASSES, IMAGE_SIZE, NUM_CLASSES

log = logging.getLogger(__name__)

CELL_IMAGES = 20  # per confusion-matrix cell
GALLERY_IMAGES = 48  # least confident, and most confident mistakes
FAILED_LISTED = 1000
ERROR_KINDS = 50  # distinct error messages counted; the rest are "other"
THUMB_SIDE = 96  # the original's thumbnail: at most this many pixels a side...
THUMB_MAX_BYTES = 3000  # ...and bytes (then 64 px JPEG, then left out)
THUMB_MAX_PIXELS = 16_000_000  # a colour original larger than this (JPEG aside: decoded scaled) is not drawn
PATH_SHOWN = 240  # characters of a path shown (a longer one is cut in the middle)
ERROR_SHOWN = 300  # characters of an error message (classify's are shorter; a foreign table's may not be)
MAX_BYTES = 20_000_000
_REQUIRED = ("path", "label", "index", "score", "error")
_BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
_LEGEND = "In each: left, what the model saw (28x28, after inversion); right, the original."


@dataclass
class ReportResult:
    path: str
    bytes: int
    seconds: float
    rows: int
    figures: int  # images drawn on the page


# ---------------------------------------------------------------------------------------------- one pass

def _key(path: str) -> bytes:
    """A 64-bit hash of the path (bytes compare as big-endian numbers): the sampling order, the same whatever
    the row order."""
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()


class Largest:
    """The k items of largest rank among those offered, for a row at a time: a min-heap of (rank, n, row),
    the row number n settling ties (a path named twice) so that rows are never compared."""

    __slots__ = ("k", "heap")

    def __init__(self, k: int) -> None:
        self.k, self.heap = k, []

    def offer(self, rank, n: int, row: dict) -> None:
        heap = self.heap
        if len(heap) < self.k:
            heapq.heappush(heap, (rank, n, row))
        elif rank >= heap[0][0] and (rank, n) > heap[0][:2]:
            heapq.heapreplace(heap, (rank, n, row))

    def rows(self) -> list[dict]:
        return [item[2] for item in self.heap]


@dataclass
class Collected:
    """What one pass over the table keeps: bounded, whatever the number of rows."""

    classified: int = 0
    failed: int = 0
    unlabelled: int = 0  # classified files outside the ImageFolder layout
    counts: list[list[int]] = field(default_factory=lambda: [[0] * NUM_CLASSES for _ in range(NUM_CLASSES)])
    top_k: int = 1
    predicted: list[int] = field(default_factory=lambda: [0] * NUM_CLASSES)  # files per predicted class
    cells: dict[tuple[int, int], Largest] = field(default_factory=dict)  # rank: the path's hash
    unsure: Largest = field(default_factory=lambda: Largest(GALLERY_IMAGES))  # rank: (-score, hash)
    wrong: Largest = field(default_factory=lambda: Largest(GALLERY_IMAGES))  # rank: (score, hash)
    failures: list[dict] = field(default_factory=list)  # the first FAILED_LISTED failed rows
    error_kinds: Counter = field(default_factory=Counter)

    @property
    def confusion(self) -> np.ndarray:
        return np.array(self.counts, dtype=np.int64)  # [true, predicted]

    def metrics(self):
        """Accuracy and per-class precision and recall, as the classify summary defines them (one place)."""
        tally = Tally()
        tally.confusion, tally.unlabelled = self.confusion, self.unlabelled
        return tally.metrics()

    @property
    def labelled(self) -> bool:
        return self.metrics()[1] is not None


def collect(rows) -> Collected:
    """Counts, matrix and samples from an iterable of rows (dicts as sinks.read_rows gives them)."""
    c = Collected()
    cells, unsure, wrong, counts = c.cells, c.unsure, c.wrong, c.counts
    truth_of: dict[str, int | None] = {}  # files of a folder share their class: look it up once per folder
    for n, row in enumerate(rows):
        if n == 0:
            missing = [k for k in _REQUIRED if k not in row]
            if missing:
                raise UserError(f"not a classify output: no column {', '.join(missing)}")
            c.top_k = 1 + sum(1 for k in row if k.startswith("label_"))
        path, pred, error = row["path"], row["index"], row["error"]
        if error:
            c.failed += 1
            error = error if len(error) <= ERROR_SHOWN else error[:ERROR_SHOWN] + "…"
            if len(c.failures) < FAILED_LISTED:
                c.failures.append({"path": path, "error": error})
            if error in c.error_kinds or len(c.error_kinds) < ERROR_KINDS:
                c.error_kinds[error] += 1
            else:
                c.error_kinds[None] += 1
            continue
        c.classified += 1
        score, key = row["score"], _key(path)
        c.predicted[pred] += 1
        unsure.offer((-score, key), n, row)
        folder = path[:max(path.rfind("/"), path.rfind(os.sep))]
        truth = truth_of.get(folder, -1)
        if truth == -1:
            truth = truth_of[folder] = images.true_class(path)
        if truth is None:
            c.unlabelled += 1
            continue
        counts[truth][pred] += 1
        cell = cells.get((truth, pred))
        if cell is None:
            cell = cells[truth, pred] = Largest(CELL_IMAGES)
        cell.offer(key, n, row)
        if truth != pred:
            wrong.offer((score, key), n, row)
    return c


# ---------------------------------------------------------------------------------------------- images

def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # (optimize=True: 40% slower, no smaller on these images)
    return buf.getvalue()


def _thumbnail(data: bytes) -> tuple[bytes, str, tuple[int, int]] | None:
    """The original, upright (EXIF, as the model saw it) and downscaled to THUMB_SIDE at most, as (bytes, mime,
    original size); None when even a small JPEG of it is over THUMB_MAX_BYTES, or when it is a colour image
    too big to thumbnail cheaply. A small file that browsers show is embedded as it is (they turn it upright
    themselves); colour stays colour, and grayscale of any depth is drawn as the decoder reads it."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        mime = _BROWSER_FORMATS.get(im.format)
        if mime and max(size) <= THUMB_SIDE and len(data) <= THUMB_MAX_BYTES:
            return data, mime, size
        gray = im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;")
        if gray and "transparency" not in im.info:
            im = Image.fromarray(images.decode_gray(data))  # images' own bounded, upright decoding
        else:
            if im.format == "JPEG":
                im.draft("RGB", (2 * THUMB_SIDE, 2 * THUMB_SIDE))  # decoded at 1/2..1/8 scale
            elif size[0] * size[1] > THUMB_MAX_PIXELS:
                return None  # the model's view is there; a full-size colour decode is not worth its memory
            im = ImageOps.exif_transpose(im)
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGBA")
        im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
        if im.mode == "RGBA":  # transparency onto white, as the model's view has it
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
        out = _png(im)
        if len(out) <= THUMB_MAX_BYTES:
            return out, "image/png", size
        for side, quality in ((THUMB_SIDE, 80), (64, 70)):
            small = im.copy()
            small.thumbnail((side, side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=quality)
            if buf.tell() <= THUMB_MAX_BYTES:
                return buf.getvalue(), "image/jpeg", size
    return None


@dataclass
class Drawn:
    seen: str | None = None  # data URI of the 28x28 model input
    original: str | None = None
    size: tuple[int, int] | None = None
    small: bool = False  # the thumbnail is tiny: draw it with square pixels
    note: str = ""


def draw(path: str, invert: str) -> Drawn:
    """A file as the model saw it and as it is, read again now (it may have changed since the run)."""
    from PIL import Image

    try:
        data = images.read_file(path)
        seen = images.load_bytes(data, invert)
    except images.ImageError as e:
        return Drawn(note=f"cannot read it now: {e}")
    d = Drawn(seen=_uri(_png(Image.fromarray(seen)), "image/png"))
    try:
        thumb = _thumbnail(data)
    except Exception as e:  # noqa: BLE001 - load_bytes decoded it; a thumbnail is extra, never a failure
        log.debug("%s: no thumbnail: %s", path, e)
        d.note = "original not drawn"
        return d
    if thumb is None:
        d.note = "original left out (too large to embed)"
    else:
        d.original, d.size = _uri(thumb[0], thumb[1]), thumb[2]
        d.small = max(d.size) <= THUMB_SIDE // 2
    return d


# ---------------------------------------------------------------------------------------------- HTML

def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _shown_path(path: str) -> str:
    """A path as text: non-UTF-8 bytes as \\xNN, very long ones cut in the middle."""
    s = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if len(s) > PATH_SHOWN:
        s = s[:PATH_SHOWN // 3] + "…" + s[-(2 * PATH_SHOWN // 3):]
    return s


def _num(n: int) -> str:
    return f"{n:,}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _topk(row: dict, k: int) -> list[tuple[str, float]]:
    out = [(row["label"], row["score"])]
    out += [(row[f"label_{i}"], row[f"score_{i}"]) for i in range(2, k + 1) if row.get(f"label_{i}") is not None]
    return out


class _Page:
    """Builds the HTML text piece by piece; ``figure`` draws a file and counts what it embeds."""

    def __init__(self, invert: str, top_k: int) -> None:
        self.parts: list[str] = []
        self.invert, self.top_k = invert, top_k
        self.figures = 0
        self._truth: dict[str, int | None] = {}

    def add(self, *text: str) -> None:
        self.parts.extend(text)

    def truth(self, path: str) -> int | None:
        folder = path[:max(path.rfind("/"), path.rfind(os.sep))]
        if folder not in self._truth:
            self._truth[folder] = images.true_class(path)
        return self._truth[folder]

    def figure(self, row: dict) -> str:
        path = row["path"]
        d = draw(path, self.invert)
        self.figures += 1
        truth = self.truth(path)
        pics = []
        if d.seen:
            pics.append(f'<img class="px" src="{d.seen}" width="84" height="84" '
                        f'alt="What the model saw: {IMAGE_SIZE}x{IMAGE_SIZE} grayscale">')
        if d.original:
            w, h = d.size
            pics.append(f'<img class="orig{" px" if d.small else ""}" src="{d.original}" width="84" height="84" '
                        f'alt="The original image, {w}x{h} pixels">')
        label = f"<b>{_e(row['label'])}</b> {row['score']:.3f}"
        if truth is None:
            verdict = f"predicted {label}"
        elif truth == row["index"]:
            verdict = f"true and predicted {label}"
        else:
            verdict = (f'<span class="bad">wrong:</span> true <b>{_e(CLASSES[truth])}</b>, '
                       f"predicted {label}")
        lines = [verdict]
        if self.top_k > 1:
            lines.append("top " + str(self.top_k) + ": " + ", ".join(f"{_e(lab)} {s:.3f}"
                                                                     for lab, s in _topk(row, self.top_k)))
        if d.note:
            lines.append(f'<span class="note">{_e(d.note)}</span>')
        return (f'<li><figure><div class="pics">{"".join(pics)}</div><figcaption>'
                f'<code class="path">{_e(_shown_path(path))}</code><br>{"<br>".join(lines)}'
                "</figcaption></figure></li>")

    def gallery(self, rows: list[dict]) -> str:
        return '<ul class="gallery">' + "".join(self.figure(r) for r in rows) + "</ul>"


def _sorted_rows(kept: Largest, reverse: bool = False) -> list[dict]:
    rows = kept.rows()
    rows.sort(key=lambda r: (r["score"], r["path"]), reverse=reverse)
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    """A two-column table of (header, value HTML)."""
    body = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{v}</td></tr>' for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _heat(count: int, row_total: int, diagonal: bool) -> str:
    if not count or not row_total:
        return ""
    share = count / row_total
    if diagonal:
        return f' style="background: rgba(37, 99, 235, {0.08 + 0.5 * share:.2f})"'
    return f' style="background: rgba(220, 38, 38, {min(0.6, 0.08 + 2.5 * share):.2f})"'


def _confusion(page: _Page, c: Collected) -> None:
    cm = c.confusion
    cells = {k: _sorted_rows(v) for k, v in c.cells.items()}
    off = [(int(cm[t, p]), t, p) for t in range(NUM_CLASSES) for p in range(NUM_CLASSES) if t != p and cm[t, p]]
    # a line break after "/" or at a space, never at a hyphen: "T-shirt/ top", not "T- shirt/top"
    head = "".join('<th scope="col">' + "/<wbr>".join(f'<span class="nw">{_e(part)}</span>' if "-" in part else _e(part)
                                                      for part in name.split("/")) + "</th>" for name in CLASSES)
    page.add('<section id="confusion"><h2>Confusion matrix</h2>',
             "<p>Rows: the true class (from the folder names); columns: the predicted class. Choose a cell to "
             f"see its files (up to {CELL_IMAGES} each, a random sample of a larger cell).</p>",
             '<div class="cm-wrap"><div class="cm-scroll"><table class="cm"><caption>Files by true class (rows) '
             "and predicted class (columns)</caption>",
             f'<thead><tr><th scope="col" class="corner">true \\ predicted</th>{head}'
             '<th scope="col">recall</th></tr></thead><tbody>')
    for t in range(NUM_CLASSES):
        total = int(cm[t].sum())
        tds = []
        for p in range(NUM_CLASSES):
            n = int(cm[t, p])
            style = _heat(n, total, t == p)
            if n:
                tds.append(f'<td{style}><a class="cm-cell" href="#cell-{t}-{p}" aria-label="true '
                           f'{_e(CLASSES[t])}, predicted {_e(CLASSES[p])}: {_num(n)} files">{_num(n)}</a></td>')
            else:
                tds.append('<td class="zero">0</td>')
        recall = _pct(cm[t, t] / total if total else None)
        page.add(f'<tr><th scope="row">{_e(CLASSES[t])}</th>{"".join(tds)}<td class="recall">{recall}</td></tr>')
    page.add("</tbody></table></div>")
    hint = ""
    if off:
        n, t, p = max(off, key=lambda x: (x[0], -x[1], -x[2]))
        hint = (f' The most frequent mistake: <a href="#cell-{t}-{p}" class="cm-cell">true {_e(CLASSES[t])}, '
                f"predicted {_e(CLASSES[p])}</a> ({_num(n)} files).")
    page.add('<div id="cell-panel" role="region" aria-label="Files of the chosen cell" tabindex="-1">',
             f'<p id="cell-status" aria-live="polite">Choose a cell of the matrix to see its files here.{hint} '
             f"{_LEGEND}</p>")
    for (t, p), rows in sorted(cells.items()):
        n = int(cm[t, p])
        left = n - len(rows)
        more = f"; {_num(left)} more not in this report (see the table)" if left else ""
        page.add(f'<section class="cell" id="cell-{t}-{p}" data-count="{n}">'
                 f'<h3>True {_e(CLASSES[t])}, predicted {_e(CLASSES[p])}: {_num(n)} files</h3>'
                 f'<p class="count">{_num(len(rows))} shown, least confident first{more}.</p>',
                 page.gallery(rows), "</section>")
    page.add("</div></div></section>")


def _per_class(page: _Page, c: Collected, labelled: bool) -> None:
    acc, metrics = c.metrics()
    page.add('<section id="per-class"><h2>Per class</h2>')
    if labelled:
        page.add(f"<p>Accuracy <strong>{acc:.2f}%</strong> on {_num(int(c.confusion.sum()))} labelled files. "
                 "Precision: of the files predicted as the class, the share that is; recall: of the files of "
                 "the class, the share predicted as it.</p>")
    else:
        page.add("<p>Not every file is in a folder named after a class (the ImageFolder layout), so there is no "
                 "accuracy: only what was predicted.</p>")
    head = '<th scope="col">class</th><th scope="col">predicted</th>'
    if labelled:
        head += '<th scope="col">files</th><th scope="col">precision</th><th scope="col">recall</th>'
    body = []
    for i, name in enumerate(CLASSES):
        cols = f'<th scope="row">{_e(name)}</th><td>{_num(c.predicted[i])}</td>'
        if labelled:
            m = metrics[i]
            cols += f"<td>{_num(m.support)}</td><td>{_pct(m.precision)}</td><td>{_pct(m.recall)}</td>"
        body.append(f"<tr>{cols}</tr>")
    page.add(f'<table class="num"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></section>')


def _failed(page: _Page, c: Collected) -> None:
    n = c.failed
    page.add(f'<section id="failed"><h2>Failed files ({_num(n)})</h2>')
    if not n:
        page.add("<p>Every file was read and classified.</p></section>")
        return
    if n > len(c.failures):
        page.add(f"<p>The first {_num(len(c.failures))} of {_num(n)}; every one has its row in the table, with its "
                 "error.</p>")
    if len(c.error_kinds) < n:  # some messages repeat: count them
        kinds = "".join(f'<tr><th scope="row">{_e(k) if k is not None else "<i>other messages</i>"}</th>'
                        f"<td>{_num(v)}</td></tr>" for k, v in c.error_kinds.most_common())
        page.add('<table class="num errors"><caption>Errors by message</caption><thead><tr>'
                 f'<th scope="col">error</th><th scope="col">files</th></tr></thead><tbody>{kinds}</tbody></table>')
    body = "".join(f'<tr><td><code class="path">{_e(_shown_path(r["path"]))}</code></td><td>{_e(r["error"])}</td>'
                   "</tr>" for r in c.failures)
    page.add('<table class="failed"><caption>Failed files and their errors</caption><thead><tr>'
             f'<th scope="col">file</th><th scope="col">error</th></tr></thead><tbody>{body}</tbody></table>'
             "</section>")


def _model_rows(model: str | Path | None) -> list[tuple[str, str]] | None:
    """The model's facts and metadata (onnxruntime alone), or None when no model was given."""
    if model is None:
        return None
    from fmnist_onnx.info import read_model_info

    mi = read_model_info(model)
    meta = dict(mi.metadata)
    rows = [("file", f"<code>{_e(mi.path)}</code> ({mi.file_size_bytes / 1e6:.2f} MB)")]
    if "classes" in meta:
        try:
            rows.append(("classes", _e(", ".join(json.loads(meta.pop("classes"))))))
        except (ValueError, TypeError):
            pass
    if "test_accuracy" in meta:
        rows.append(("test accuracy", _e(meta.pop("test_accuracy")) + "% (Fashion-MNIST test split, at export)"))
    if "weights_sha256" in meta:
        rows.append(("weights SHA-256", f"<code>{_e(meta.pop('weights_sha256'))}</code>"))
    rows.append(("parameters", f"{mi.parameters:,} ({'int8 quantized' if mi.quantized else 'fp32'}), opset {mi.opset}"))
    rows += [(k, _e(v)) for k, v in sorted(meta.items())]  # onnxruntime's map has no order of its own
    return rows


def _run_rows(c: Collected, predictions: str, run: dict | None, invert: str) -> list[tuple[str, str]]:
    t = c
    rows = [("predictions", f"<code>{_e(_shown_path(predictions))}</code>" + (f", top {c.top_k}" if c.top_k > 1
                                                                                 else "")),
            ("files", f"{_num(t.classified + t.failed)}: {_num(t.classified)} classified, {_num(t.failed)} failed")]
    if run and not run.get("already_complete"):
        rows += [("skipped", f"{_num(run['skipped'])} other files in the folders (not images: no row)"),
                 ("provider", f"{_e(run['provider'])}, {run['workers']} decoding processes, {_e(run['decoder'])}"),
                 ("speed", f"{run['images_per_s']:,.0f} images/s ({run['seconds']:.2f} s, walking and writing "
                           "included)")]
        if run.get("resumed"):
            rows.append(("resumed", f"{_num(run['resumed'])} rows from an interrupted run"))
    else:
        rows.append(("provider, speed, skipped", "not recorded in the table (give `report --summary` the JSON "
                                                 "that `classify --json` printed)"))
    rows.append(("images drawn with", f"--invert {_e(invert)}, as the run preprocessed them"))
    return rows


_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg2: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
main, header, nav { max-width: 1440px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 16px; margin: 0 0 4px; }
p { margin: 6px 0; max-width: 90ch; }
.sub { color: var(--muted); margin: 0; }
nav { padding-top: 8px; padding-bottom: 8px; }
nav a { margin-right: 14px; }
a { color: var(--accent); }
a:focus-visible, [tabindex]:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; border-radius: 2px; }
dl.glance { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 0; }
dl.glance div { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 120px; }
dl.glance dt { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
dl.glance dd { margin: 0; font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
dl.glance dd .small { font-size: 16px; }
.nw { white-space: nowrap; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: var(--bg2); }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
table.num td { text-align: right; }
table.errors, table.failed { margin-top: 12px; }
table.kv th { background: var(--bg2); font-weight: 600; white-space: nowrap; }
.cm-wrap { display: grid; grid-template-columns: minmax(0, auto) minmax(0, 1fr); gap: 24px; align-items: start; }
@media (max-width: 1250px) { .cm-wrap { grid-template-columns: minmax(0, 1fr); } }
.cm-scroll { overflow-x: auto; }
table.cm caption { font-weight: 400; color: var(--muted); font-size: 13px; }
table.cm th { font-size: 13px; }
table.cm tbody th { padding: 6px 8px; }
table.cm thead th { width: 64px; vertical-align: bottom; text-align: center; }
table.cm thead th.corner { width: auto; text-align: left; color: var(--muted); font-weight: 400; }
table.cm td { padding: 0; text-align: right; min-width: 58px; }
table.cm td.zero { color: #8c959f; padding: 6px 8px; }
table.cm td.recall { padding: 6px 8px; color: var(--muted); }
a.cm-cell { display: block; padding: 6px 8px; color: var(--fg); text-decoration: none; }
a.cm-cell:hover { text-decoration: underline; }
table.cm a[aria-current="true"] { box-shadow: inset 0 0 0 3px var(--fg); font-weight: 700; }
#cell-panel { min-width: 0; }
#cell-status { color: var(--muted); }
#cell-status a.cm-cell { display: inline; padding: 0; color: var(--accent); text-decoration: underline; }
.cell { display: none; }
.cell:target { display: block; }
#cell-panel:has(.cell:target) #cell-status { display: none; }
.js .cell, .js .cell:target { display: none; }
.js .cell.shown { display: block; }
.count { color: var(--muted); font-size: 13px; }
ul.gallery { list-style: none; margin: 8px 0 0; padding: 0; display: grid; gap: 10px;
  grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); }
figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; height: 100%; }
.pics { display: flex; gap: 6px; }
.pics img { width: 84px; height: 84px; background: var(--bg2); object-fit: contain; }
.pics img.px { image-rendering: pixelated; background: #000; }
.pics img.orig.px { background: var(--bg2); }
figcaption { font-size: 12.5px; margin-top: 6px; }
code.path { font-size: 11.5px; color: var(--muted); word-break: break-all; }
table.failed code.path { font-size: 13px; color: var(--fg); }
table.errors th { font-weight: 400; background: none; }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
.bad { color: #b42318; font-weight: 600; }
.note { color: #9a6700; }
footer { max-width: 1440px; margin: 32px auto; padding: 0 24px; color: var(--muted); font-size: 13px; }
"""

_SCRIPT = """
(function () {
  // Without this script a cell's link shows its files through CSS :target (the page jumps there);
  // with it, the files show in place, the chosen cell is marked, and the status line says what is shown.
  document.documentElement.classList.add("js");
  var panel = document.getElementById("cell-panel");
  if (!panel) return;
  var status = document.getElementById("cell-status");
  var first = status.innerHTML;
  var sections = panel.querySelectorAll("section.cell");
  var links = document.querySelectorAll("a.cm-cell");
  function show(id) {
    var shown = null;
    sections.forEach(function (s) { var on = s.id === id; s.classList.toggle("shown", on); if (on) shown = s; });
    document.querySelectorAll("table.cm a.cm-cell").forEach(function (a) {
      if (a.getAttribute("href") === "#" + id) a.setAttribute("aria-current", "true");
      else a.removeAttribute("aria-current");
    });
    // the section's heading says what is shown; the status line says it again to screen readers only
    if (shown) status.textContent = "Showing " + shown.querySelector("h3").textContent + ".";
    else status.innerHTML = first;
    status.classList.toggle("sr-only", !!shown);
    return shown;
  }
  links.forEach(function (a) {
    a.addEventListener("click", function (ev) {
      ev.preventDefault();
      var id = a.getAttribute("href").slice(1);
      history.replaceState(null, "", "#" + id);
      var shown = show(id);
      if (shown && shown.getBoundingClientRect().top > window.innerHeight) shown.scrollIntoView();
    });
  });
  window.addEventListener("hashchange", function () { show(location.hash.slice(1)); });
  if (location.hash.indexOf("#cell-") === 0) show(location.hash.slice(1));
})();
"""


def render(c: Collected, predictions: str, model: str | Path | None = None, invert: str = "auto",
           run: dict | None = None) -> tuple[str, int]:
    """The page's HTML text, and the number of files drawn on it."""
    labelled = c.labelled
    page = _Page(invert, c.top_k)
    t = c
    files = t.classified + t.failed
    name = Path(predictions).name
    model_rows = _model_rows(model)
    acc = t.metrics()[0]

    glance = [("files", _num(files)), ("classified", _num(t.classified)), ("failed", _num(t.failed))]
    if labelled:
        glance.append(("accuracy", f"{acc:.2f}%"))
    if run and not run.get("already_complete"):
        glance += [("skipped", _num(run["skipped"])), ("speed", f"{run['images_per_s']:,.0f}/s")]
        glance.append(("provider", _e(run["provider"])))
    if model is not None:
        glance.append(("model", f'<span class="small">{_e(Path(model).name)}</span>'))
    glance_html = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in glance)
    nav = []
    if labelled:
        nav.append(("confusion", "Confusion matrix"))
    nav += [("per-class", "Per class")]
    if labelled:
        nav.append(("misclassified", "Misclassified"))
    nav += [("unsure", "Least confident"), ("failed", f"Failed files ({_num(t.failed)})"), ("run", "Run"),
            ("model", "Model")]

    page.add("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             # no request leaves the page: images are data: URIs, style and script are inline
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
             '<link rel="icon" href="data:,">',
             f"<title>{_e(name)}: classify report</title><style>{_CSS}</style></head><body>",
             f'<header><h1>Classify report: {_e(name)}</h1><p class="sub">{_num(files)} files, '
             f"{_num(t.classified)} classified, {_num(t.failed)} failed"
             + (f", accuracy {acc:.2f}%" if labelled else "") + "</p>",
             f'<dl class="glance">{glance_html}</dl></header>',
             '<nav aria-label="Sections">' + "".join(f'<a href="#{i}">{_e(s)}</a>' for i, s in nav) + "</nav>",
             "<main>")
    if labelled:
        _confusion(page, c)
    _per_class(page, c, labelled)
    if labelled:
        wrong = _sorted_rows(c.wrong, reverse=True)
        n_wrong = int(t.confusion.sum() - np.trace(t.confusion))
        page.add('<section id="misclassified"><h2>Misclassified, most confident first</h2>',
                 f"<p>{_num(len(wrong))} of {_num(n_wrong)} misclassified files: the ones the model was surest of. "
                 f"{_LEGEND}</p>",
                 page.gallery(wrong) if wrong else "<p>None.</p>", "</section>")
    unsure = _sorted_rows(c.unsure)
    page.add('<section id="unsure"><h2>Least confident predictions</h2>',
             f"<p>The {_num(len(unsure))} lowest top-1 scores of {_num(t.classified)} classified files. {_LEGEND}</p>",
             page.gallery(unsure) if unsure else "<p>None.</p>", "</section>")
    _failed(page, c)
    page.add('<section id="run"><h2>Run</h2>', _table(_run_rows(c, predictions, run, invert)), "</section>",
             '<section id="model"><h2>Model</h2>')
    if model_rows is None:
        page.add("<p>No model given: <code>fmnist-onnx report PREDICTIONS -m MODEL</code> adds its metadata.</p>")
    else:
        page.add(_table(model_rows))
    page.add("</section></main>",
             f"<footer>Made by fmnist-onnx from {_e(_shown_path(predictions))}. Samples: up to {CELL_IMAGES} files "
             f"per matrix cell, {GALLERY_IMAGES} per gallery, {FAILED_LISTED:,} failed files.</footer>",
             f"<script>{_SCRIPT}</script></body></html>\n")
    html_text = "".join(page.parts)
    log.info("report: %d figures, %d bytes", page.figures, len(html_text))
    return html_text, page.figures


# ---------------------------------------------------------------------------------------------- the command

def default_output(predictions: str | Path) -> Path:
    p = Path(predictions)
    return p.with_name(p.stem + ".report.html")


def check_destination(dest: str | Path, predictions: str | Path | None = None) -> Path:
    """UserError unless the report can be written there (checked before a classify run starts)."""
    dest = Path(dest)
    if dest.is_dir():
        raise UserError(f"report {dest} is a folder; give a file name")
    if not dest.parent.is_dir():
        raise UserError(f"report {dest}: folder {dest.parent} does not exist")
    if predictions is not None and os.path.abspath(dest) == os.path.abspath(predictions):
        raise UserError(f"{dest} is the predictions table itself; write the report elsewhere")
    return dest


def check_table(path: str) -> None:
    """UserError unless the file starts as a classify output does (its columns), before reading it all."""
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        head = f.readline(1 << 16)
    if not head:
        return  # an empty output: JSONL without a row
    if magic == b"PAR1":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return  # read_rows says what to install
        try:
            cols = pq.ParquetFile(path).schema_arrow.names
        except Exception:  # noqa: BLE001 - pyarrow's errors for a damaged file are of several types
            raise UserError(f"{path}: not a readable Parquet file") from None
    elif head.startswith(b"{"):
        try:
            cols = list(json.loads(head))
        except (ValueError, TypeError):
            raise UserError(f"{path}: not a classify output (its first line is not a JSON object)") from None
    else:
        cols = next(csv.reader([head.decode("utf-8", "replace")]), [])
    missing = [c for c in _REQUIRED if c not in cols]
    if missing:
        raise UserError(f"{path}: not a classify output (no column {', '.join(missing)})")


def load_summary(path: str | Path) -> dict:
    """The JSON that ``classify --json`` printed."""
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--summary {path}: {e.strerror or e}") from None
    except ValueError:
        raise UserError(f"--summary {path}: not JSON (use what `classify --json` printed)") from None
    if not isinstance(run, dict) or not {"provider", "skipped", "seconds", "images_per_s"} <= set(run):
        raise UserError(f"--summary {path}: not a classify summary (use what `classify --json` printed)")
    return run


def build_report(predictions: str | Path, dest: str | Path, model: str | Path | None = None,
                 invert: str = "auto", run=None) -> ReportResult:
    """Write the report of the table ``predictions`` to ``dest`` (atomically). ``run``: the run's summary
    (a ClassifySummary, or its JSON as a dict), for what the table does not hold."""
    t0 = time.perf_counter()
    predictions = os.fspath(predictions)
    if predictions.endswith(JOURNAL_SUFFIX):
        raise UserError(f"{predictions} is an interrupted run's journal; finish it with `classify --resume` first")
    if not os.path.isfile(predictions):
        raise UserError(f"{predictions}: no such file")
    if invert not in images.INVERT_MODES:
        raise UserError(f"--invert must be one of {', '.join(images.INVERT_MODES)}")
    if model is not None and not Path(model).is_file():
        raise UserError(f"model file not found: {model}")
    dest = check_destination(dest, predictions)
    check_table(predictions)
    if is_dataclass(run):
        run = asdict(run)
    c = collect(read_rows(predictions))
    text, figures = render(c, predictions, model, invert, run)
    data = text.encode("utf-8")
    if len(data) > MAX_BYTES:  # the samples' bounds make this impossible; say so loudly if they ever fail
        log.warning("%s is %d bytes, over the %d bound", dest, len(data), MAX_BYTES)
    try:
        atomic_write(dest, lambda p: p.write_bytes(data))
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from None
    return ReportResult(str(dest), len(data), round(time.perf_counter() - t0, 3),
                        c.classified + c.failed, figures)
