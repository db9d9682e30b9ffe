"""report: one classify run as a self-contained HTML page (images embedded, no network, no server).

Made from the output table (any format, read streaming with table.read_rows) plus, when there is one, what
the run's summary knows that the table does not (provider, speed, skipped files). One pass over the rows
keeps counts, the confusion matrix and bounded samples:
- per matrix cell, the CELL_IMAGES files of largest path hash: a uniform sample that does not depend on the
  row order (the Ray engine writes rows as they are done: its table gives the same samples);
- the GALLERY_IMAGES least confident predictions, and (labelled folders) the GALLERY_IMAGES most confident
  mistakes, with heaps;
- the first FAILED_LISTED failed files, and their errors counted by message.
Only the sampled files are read back from disk, each once per page whatever the number of rows naming it (the
decoding is classify's own, bounded), to draw them as the model saw them (28x28 after inversion, with the
run's --invert) beside a thumbnail of the original. So the page stays small whatever the number of rows: at
most 100*CELL_IMAGES + 2*GALLERY_IMAGES figures of at most ~7 kB each (the thumbnail is capped at
THUMB_MAX_BYTES, the 28x28 view is under 1 kB, paths and errors are cut to a few hundred characters): under
16 MB in the worst case, within MAX_BYTES.

Everything read is treated as crafted: the table's rows and the summary are checked by type and range (one
line naming the file and row, exit 2, never a traceback), names and messages are shown with their control
and bidirectional characters as escapes (``text.visible``), and the page is rendered by a Jinja2 template
with autoescaping (``report_page``) under a Content-Security-Policy that allows only its own script.

The report obeys the write policy of ``files``: an existing page is replaced only with ``overwrite``, never
one of its inputs (the table, the model, the summary, the confusion PNG, an image the table names), and
atomically. No torch here.
"""

from __future__ import annotations

import base64
import csv
import heapq
import io
import json
import logging
import math
import os
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.classify import Tally, confusion_png_path
from fmnist_onnx.classify.predict import row_truth
from fmnist_onnx.classify.run_files import RunFiles
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import atomic_write_bytes, check_distinct, check_output
from fmnist_onnx.journal import JOURNAL_SUFFIX
from fmnist_onnx.spec import CLASSES, IMAGE_SIZE, INVERT_MODES, NUM_CLASSES
from fmnist_onnx.table import path_digest, read_rows
from fmnist_onnx.text import visible

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
SUMMARY_MAX_BYTES = 16 << 20  # `classify --json` prints a few kB; anything this big is not one
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


# ---------------------------------------------------------------------------------------------- checking input

def _kind(v: object) -> str:
    """A value's type in the words of JSON, for messages."""
    if v is None:
        return "empty"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "text"
    return "a list" if isinstance(v, list | tuple) else "an object" if isinstance(v, dict) else type(v).__name__


def _shown_value(v: object) -> str:
    """A value from a file, for a one-line message: short scalars as they are, anything else by its type."""
    if isinstance(v, str | int | float | bool) or v is None:
        s = repr(v) if not isinstance(v, int) or isinstance(v, bool) or abs(v) < 10**30 else "a huge number"
        return visible(s if len(s) <= 60 else s[:57] + "...")
    return _kind(v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What read_rows may raise on a file that is not what classify wrote: json and csv parse errors, int() and
# float() on text, a row that is a list (TypeError), JSON nested deeper than the parser's recursion, pyarrow's
# errors (subclasses of these). UserError (table's own "damaged" message) passes through as it is.
_READ_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError, OverflowError,
                NotImplementedError, OSError)


def _read_error(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    if isinstance(e, OSError) and e.errno:
        return e.strerror or str(e)
    if isinstance(e, TypeError | KeyError | AttributeError | IndexError):
        return "not a row of the columns and types classify writes"
    text = str(e).strip().splitlines()
    return visible(text[0][:200]) if text else type(e).__name__


def checked_rows(path: str, rows: Iterator[dict]) -> Iterator[dict]:
    """``rows`` (from table.read_rows of ``path``, which checks each by type and range: ``table.row_problem``,
    the one row checker), with what else reading may raise as a UserError naming the file and the row (counted
    from 1, after a CSV's header)."""
    name, n = visible(path), 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except UserError:
            raise
        except _READ_ERRORS as e:
            raise UserError(f"{name}: row {n + 1} cannot be read: {_read_error(e)}") from None
        n += 1
        yield row


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
            raise UserError(f"{visible(path)}: not a readable Parquet file") from None
    elif head.startswith(b"{"):
        try:
            first = json.loads(head)
        except (ValueError, RecursionError):
            first = None
        if not isinstance(first, dict):
            raise UserError(f"{visible(path)}: not a classify output (its first line is not a JSON object)")
        cols = list(first)
    else:
        try:
            cols = next(csv.reader([head.decode("utf-8", "replace").replace("\0", "")]), [])
        except csv.Error:  # a lone CR, say: not a header classify writes
            cols = []
    missing = [c for c in _REQUIRED if c not in cols]
    if missing:
        raise UserError(f"{visible(path)}: not a classify output (no column {', '.join(missing)})")


# The summary `classify --json` prints (ClassifySummary): what the page shows must be there, every field the
# right type. kind: text, count (an integer >= 0), number (finite, >= 0), flag, list; "?" also allows null.
# Fields the report does not know are left alone (a newer classify may add some).
_SUMMARY_FIELDS = {"provider": ("text", True), "workers": ("count", True), "decoder": ("text", True),
                   "skipped": ("count", True), "seconds": ("number", True), "images_per_s": ("number", True),
                   "resumed": ("count", False), "already_complete": ("flag", False), "output": ("text", False),
                   "format": ("text", False), "files": ("count", False), "classified": ("count", False),
                   "failed": ("count", False), "accuracy_pct": ("number?", False), "per_class": ("list?", False),
                   "confusion_png": ("text?", False), "failures": ("list", False)}
_KIND_WORDS = {"text": "text", "count": "a whole number of at least 0", "number": "a number of at least 0",
               "flag": "true or false", "list": "a list"}


def _fits(v: object, kind: str) -> bool:
    if kind.endswith("?"):
        return v is None or _fits(v, kind[:-1])
    if kind == "text":
        return isinstance(v, str)
    if kind == "count":
        return _is_int(v) and v >= 0
    if kind == "number":
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    if kind == "flag":
        return isinstance(v, bool)
    return isinstance(v, list) and all(isinstance(item, dict) for item in v)


def check_summary(run: object, source: str) -> dict:
    """``run`` as a classify summary, or UserError (one line naming ``source``) for a missing field or a value
    of the wrong type."""
    if not isinstance(run, dict):
        raise UserError(f"{source}: not a classify summary (it is {_kind(run)}, not a JSON object; use what "
                        "`classify --json` printed)")
    for key, (kind, required) in _SUMMARY_FIELDS.items():
        if key not in run:
            if required:
                raise UserError(f"{source}: not a classify summary (no field {key}; use what `classify --json` "
                                "printed)")
            continue
        if not _fits(run[key], kind):
            want = _KIND_WORDS[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
            what = "a list of objects" if kind.startswith("list") else want
            raise UserError(f"{source}: field {key} must be {what}, not {_shown_value(run[key])}")
    return run


def load_summary(path: str | Path) -> dict:
    """The JSON that ``classify --json`` printed, checked by type (UserError, one line, otherwise)."""
    source = f"--summary {visible(path)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang the command
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"{source}: not a regular file")
            data = f.read(SUMMARY_MAX_BYTES + 1)
    except OSError as e:
        raise UserError(f"{source}: {e.strerror or e}") from None
    if len(data) > SUMMARY_MAX_BYTES:
        raise UserError(f"{source}: over {SUMMARY_MAX_BYTES >> 20} MiB, not a classify summary")
    try:
        run = json.loads(data)
    except RecursionError:
        raise UserError(f"{source}: JSON nested too deeply, not a classify summary") from None
    except ValueError:
        raise UserError(f"{source}: not JSON (use what `classify --json` printed)") from None
    return check_summary(run, source)


# ---------------------------------------------------------------------------------------------- one pass

def _key(path: str) -> bytes:
    """A 64-bit hash of the path (bytes compare as big-endian numbers): the sampling order, the same whatever
    the row order. A name that is not UTF-8 is hashed as os.fsdecode keeps it (its bytes)."""
    return path_digest(path, as_named=True)


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

    def fail(self, path: str, error: str) -> None:
        self.failed += 1
        error = error if len(error) <= ERROR_SHOWN else error[:ERROR_SHOWN] + "…"
        if len(self.failures) < FAILED_LISTED:
            self.failures.append({"path": path, "error": error})
        if error in self.error_kinds or len(self.error_kinds) < ERROR_KINDS:
            self.error_kinds[error] += 1
        else:
            self.error_kinds[None] += 1


def true_class_of(row: dict) -> int | None:
    """A row's true class (classify's predict.row_truth: its true_label column, or an earlier version's
    folder names), None where it has none."""
    truth = row_truth(row)
    return None if truth < 0 else truth


def collect(rows: Iterable[dict]) -> Collected:
    """Counts, matrix and samples from rows as ``checked_rows`` gives them (their types already checked)."""
    c = Collected()
    cells, unsure, wrong, counts = c.cells, c.unsure, c.wrong, c.counts
    for n, row in enumerate(rows):
        if n == 0:
            c.top_k = 1 + sum(1 for k in row if k.startswith("label_"))
        path, pred, error = row["path"], row["index"], row["error"]
        if error:
            c.fail(path, error)
            continue
        c.classified += 1
        score, key = row["score"], _key(path)
        c.predicted[pred] += 1
        unsure.offer((-score, key), n, row)
        truth = true_class_of(row)
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


def _small(im):
    """A Pillow image of the original at THUMB_SIDE at most, or None: a colour image too big to thumbnail cheaply
    (the model's view is there; a full-size colour decode is not worth its memory)."""
    from PIL import Image, ImageOps

    if im.format == "JPEG":
        im.draft("RGB", (2 * THUMB_SIDE, 2 * THUMB_SIDE))  # decoded at 1/2..1/8 scale
    elif im.size[0] * im.size[1] > THUMB_MAX_PIXELS:
        return None
    im = ImageOps.exif_transpose(im)
    if im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA")
    im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    if im.mode == "RGBA":  # transparency onto white, as the model's view has it
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im


def _thumbnail(data: bytes, gray: np.ndarray) -> tuple[bytes, str, tuple[int, int]] | None:
    """The original, upright (EXIF, as the model saw it) and downscaled to THUMB_SIDE at most, as (bytes, mime,
    original size); None when even a small JPEG of it is over THUMB_MAX_BYTES, or when it is a colour image
    too big to thumbnail cheaply. A small file that browsers show is embedded as it is (they turn it upright
    themselves); colour stays colour, and grayscale of any depth is drawn from ``gray``, the decoding the
    model's view was made of (a huge grayscale original is decoded once, not twice)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        mime = _BROWSER_FORMATS.get(im.format)
        if mime and max(size) <= THUMB_SIDE and len(data) <= THUMB_MAX_BYTES:
            return data, mime, size
        is_gray = im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;")
        if is_gray and "transparency" not in im.info:
            small = Image.fromarray(gray)
            small.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)  # reduces by blocks first
        else:
            small = _small(im)
        if small is None:
            return None
        out = _png(small)
        if len(out) <= THUMB_MAX_BYTES:
            return out, "image/png", size
        for side, quality in ((THUMB_SIDE, 80), (64, 70)):
            smaller = small.copy()
            smaller.thumbnail((side, side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            smaller.save(buf, format="JPEG", quality=quality)
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


def draw(path: str, invert: str, image_column: str | None = None) -> Drawn:
    """A file as the model saw it and as it is, read again now (it may have changed since the run), with
    classify's own bounded decoding (a big JPEG at a reduced scale, a pixel limit before any decoding).
    ``image_column``: the run's --image-column, for a Parquet row."""
    from fmnist_onnx.classify.sources import read_path

    try:
        data = read_path(path, image_column)
    except images.ImageError as e:
        return Drawn(note=f"cannot read it now: {e}")
    except ValueError:  # a name with a NUL byte (a crafted table): no file has it
        return Drawn(note="cannot read it now: not a possible file name")
    return draw_bytes(path, data, invert)


def draw_bytes(path: str, data: bytes | Exception, invert: str) -> Drawn:
    """``draw``'s figure of the bytes read (or the error met reading them)."""
    from PIL import Image

    try:
        if isinstance(data, Exception):
            raise data
        gray = images.decode_gray(data, path)
        seen = images.preprocess_gray(gray, invert)
    except images.ImageError as e:
        return Drawn(note=f"cannot read it now: {e}")
    d = Drawn(seen=_uri(_png(Image.fromarray(seen)), "image/png"))
    try:
        thumb = _thumbnail(data, gray)
    except Exception as e:  # noqa: BLE001 - the file decoded; a thumbnail is extra, never a failure
        log.debug("%s: no thumbnail: %s", path, e)
        d.note = "original not drawn"
        return d
    if thumb is None:
        d.note = "original left out (too large to embed)"
    else:
        d.original, d.size = _uri(thumb[0], thumb[1]), thumb[2]
        d.small = max(d.size) <= THUMB_SIDE // 2
    return d


class Drawer:
    """``draw`` for one page, each file once: keyed by what the name leads to on disk (device, inode, size,
    modification time), so that many rows naming one file, or links to it, cost one read and one decode; and
    the files of one archive read together (``prefetch``), in one pass over it."""

    def __init__(self, invert: str, image_column: str | None = None) -> None:
        self.invert, self.image_column = invert, image_column
        self.figures = 0
        self._done: dict[tuple, Drawn] = {}

    @property
    def files(self) -> int:
        return len(self._done)

    def __call__(self, path: str) -> Drawn:
        self.figures += 1
        key = _file_key(path)
        drawn = self._done.get(key)
        if drawn is None:
            drawn = self._done[key] = draw(path, self.invert, self.image_column)
        return drawn

    def prefetch(self, paths: Iterable[str]) -> None:
        """Draw ``paths`` now, those inside one archive in one pass over it (sources.read_paths: a compressed
        tar read a member at a time, from the start, was streamed again for every figure), a file at a time."""
        from fmnist_onnx.classify.sources import read_paths

        keys = {path: _file_key(path) for path in paths}
        todo = dict.fromkeys(path for path, key in keys.items() if key not in self._done)
        for path, data in read_paths(todo, self.image_column):
            if keys[path] not in self._done:  # (two names of one file)
                self._done[keys[path]] = draw_bytes(path, data, self.invert)


def _file_key(path: str) -> tuple:
    """What a row's path leads to on disk (device, inode, size, modification time), or the path itself (a
    member of an archive, a file gone)."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
    except (OSError, ValueError):
        return (path,)


# ---------------------------------------------------------------------------------------------- the page's values
# Plain values for the template (report_page), which escapes every one of them. Text from outside goes through
# visible() here first: a control or bidirectional character in a name is shown as an escape, not obeyed.

def _shown_path(path: str) -> str:
    """A path as text: control, bidirectional and non-UTF-8 characters as escapes, a very long one cut in the
    middle."""
    s = visible(path)
    if len(s) > PATH_SHOWN:
        s = s[:PATH_SHOWN // 3] + "…" + s[-(2 * PATH_SHOWN // 3):]
    return s


def _num(n: int) -> str:
    return f"{n:,}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


class _Figures:
    """A row as the template's figure: its file drawn (once per page), its caption's values."""

    def __init__(self, drawer: Drawer, top_k: int) -> None:
        self.drawer, self.top_k = drawer, top_k

    def __call__(self, row: dict) -> dict:
        path = row["path"]
        d = self.drawer(path)
        truth = true_class_of(row)
        top = [(row["label"], f"{row['score']:.3f}")]
        top += [(row[f"label_{i}"], f"{row[f'score_{i}']:.3f}") for i in range(2, self.top_k + 1)
                if row.get(f"label_{i}") is not None and row.get(f"score_{i}") is not None]
        width, height = d.size or (0, 0)
        return {"seen": d.seen, "original": d.original, "width": width, "height": height, "small": d.small,
                "note": visible(d.note), "path": _shown_path(path), "label": row["label"], "score": top[0][1],
                "truth": None if truth is None else CLASSES[truth], "right": truth == row["index"],
                "top": top if self.top_k > 1 else None}

    def many(self, rows: list[dict]) -> list[dict]:
        return [self(r) for r in rows]


def _sorted_rows(kept: Largest, reverse: bool = False) -> list[dict]:
    rows = kept.rows()
    rows.sort(key=lambda r: (r["score"], r["path"]), reverse=reverse)
    return rows


def _heat(count: int, row_total: int, diagonal: bool) -> str:
    share = count / row_total
    if diagonal:
        return f"rgba(37, 99, 235, {0.08 + 0.5 * share:.2f})"
    return f"rgba(220, 38, 38, {min(0.6, 0.08 + 2.5 * share):.2f})"


def _confusion(c: Collected, figures: _Figures) -> dict:
    cm = c.confusion
    rows = []
    for t in range(NUM_CLASSES):
        total = int(cm[t].sum())
        cells = [{"t": t, "p": p, "count": _num(int(cm[t, p])) if cm[t, p] else None, "predicted": CLASSES[p],
                  "heat": _heat(int(cm[t, p]), total, t == p) if cm[t, p] else ""} for p in range(NUM_CLASSES)]
        rows.append({"name": CLASSES[t], "cells": cells, "recall": _pct(cm[t, t] / total if total else None)})
    off = [(int(cm[t, p]), t, p) for t in range(NUM_CLASSES) for p in range(NUM_CLASSES) if t != p and cm[t, p]]
    hint = None
    if off:
        n, t, p = max(off, key=lambda x: (x[0], -x[1], -x[2]))
        hint = {"t": t, "p": p, "true": CLASSES[t], "predicted": CLASSES[p], "count": _num(n)}
    sections = []
    for (t, p), kept in sorted(c.cells.items()):
        shown, n = _sorted_rows(kept), int(cm[t, p])
        sections.append({"t": t, "p": p, "n": n, "count": _num(n), "true": CLASSES[t], "predicted": CLASSES[p],
                         "shown": _num(len(shown)), "left": _num(n - len(shown)) if n > len(shown) else None,
                         "figures": figures.many(shown)})
    return {"rows": rows, "hint": hint, "cells": sections}


def _per_class(c: Collected, labelled: bool) -> dict:
    metrics = c.metrics()[1]
    rows = []
    for i, name in enumerate(CLASSES):
        row = {"name": name, "predicted": _num(c.predicted[i])}
        if labelled:
            m = metrics[i]
            row.update(support=_num(m.support), precision=_pct(m.precision), recall=_pct(m.recall))
        rows.append(row)
    return {"labelled": _num(int(c.confusion.sum())), "rows": rows}


def _failures(c: Collected) -> dict:
    kinds = None
    if len(c.error_kinds) < c.failed:  # some messages repeat: count them
        kinds = [(None if k is None else visible(k), _num(v)) for k, v in c.error_kinds.most_common()]
    return {"rows": [(_shown_path(r["path"]), visible(r["error"])) for r in c.failures],
            "more": c.failed > len(c.failures), "listed": _num(len(c.failures)), "kinds": kinds}


def _kv(key: str, *parts: str | tuple[str, bool]) -> dict:
    """A row of a two-column table: parts are text, or (text, True) for text shown as code."""
    return {"key": key, "parts": [p if isinstance(p, tuple) else (p, False) for p in parts]}


def model_rows(model: str | Path | None) -> list[dict] | None:
    """The model's facts and metadata (onnxruntime alone), or None when no model was given. UserError for a
    file that is not a model of this signature (read before the table, not after it)."""
    if model is None:
        return None
    from fmnist_onnx.info import read_model_info

    mi = read_model_info(model)
    meta = {visible(k): visible(v) for k, v in mi.metadata.items()}
    rows = [_kv("file", (visible(mi.path), True), f" ({mi.file_size_bytes / 1e6:.2f} MB)")]
    if "classes" in meta:
        try:
            names = json.loads(meta.pop("classes"))
            rows.append(_kv("classes", ", ".join(visible(n) for n in names)))
        except (ValueError, TypeError, RecursionError):
            pass
    if "test_accuracy" in meta:
        rows.append(_kv("test accuracy", meta.pop("test_accuracy") + "% (Fashion-MNIST test split, at export)"))
    if "weights_sha256" in meta:
        rows.append(_kv("weights SHA-256", (meta.pop("weights_sha256"), True)))
    rows.append(_kv("parameters", f"{mi.parameters:,} ({'int8 quantized' if mi.quantized else 'fp32'}), "
                                  f"opset {mi.opset}"))
    rows += [_kv(k, v) for k, v in sorted(meta.items())]  # onnxruntime's map has no order of its own
    return rows


def _run_rows(c: Collected, predictions: str, run: dict | None, invert: str) -> list[dict]:
    rows = [_kv("predictions", (_shown_path(predictions), True), f", top {c.top_k}" if c.top_k > 1 else ""),
            _kv("files", f"{_num(c.classified + c.failed)}: {_num(c.classified)} classified, "
                         f"{_num(c.failed)} failed")]
    if run and not run.get("already_complete"):
        rows += [_kv("skipped", f"{_num(run['skipped'])} other files in the folders (not images: no row)"),
                 _kv("provider", f"{visible(run['provider'])}, {run['workers']} decoding processes, "
                                 f"{visible(run['decoder'])}"),
                 _kv("speed", f"{run['images_per_s']:,.0f} images/s ({run['seconds']:.2f} s, walking and "
                              "writing included)")]
        if run.get("resumed"):
            rows.append(_kv("resumed", f"{_num(run['resumed'])} rows from an interrupted run"))
    else:
        rows.append(_kv("provider, speed, skipped", "not recorded in the table (give `report --summary` the JSON "
                                                    "that `classify --json` printed)"))
    rows.append(_kv("images drawn with", f"--invert {invert}, as the run preprocessed them"))
    return rows


def _glance(c: Collected, model: str | Path | None, run: dict | None) -> list[dict]:
    acc = c.metrics()[0]
    items = [("files", _num(c.classified + c.failed)), ("classified", _num(c.classified)),
             ("failed", _num(c.failed))]
    if c.labelled:
        items.append(("accuracy", f"{acc:.2f}%"))
    if run and not run.get("already_complete"):
        items += [("skipped", _num(run["skipped"])), ("speed", f"{run['images_per_s']:,.0f} images/s"),
                  ("provider", visible(run["provider"]))]
    glance = [{"key": k, "value": v, "small": False} for k, v in items]
    if model is not None:
        glance.append({"key": "model", "value": visible(Path(model).name), "small": True})
    return glance


def _nav(c: Collected, labelled: bool) -> list[tuple[str, str]]:
    nav = [("confusion", "Confusion matrix")] if labelled else []
    nav += [("per-class", "Per class")]
    if labelled:
        nav.append(("misclassified", "Misclassified"))
    return nav + [("unsure", "Least confident"), ("failed", f"Failed files ({_num(c.failed)})"), ("run", "Run"),
                  ("model", "Model")]


def render(c: Collected, predictions: str, model: str | Path | None = None, invert: str = "auto",
           run: dict | None = None, model_info: list[dict] | None = None,
           image_column: str | None = None) -> tuple[str, int]:
    """The page's HTML text, and the number of figures drawn on it. ``model_info``: ``model_rows(model)``,
    when the caller read it already."""
    from fmnist_onnx.report_page import render_page

    labelled = c.labelled
    drawer = Drawer(invert, image_column)
    shown = [*(kept for cell in c.cells.values() for kept in cell.rows()), *c.wrong.rows()] if labelled else []
    drawer.prefetch(row["path"] for row in [*shown, *c.unsure.rows()])
    figures = _Figures(drawer, c.top_k)
    wrong = _sorted_rows(c.wrong, reverse=True)
    unsure = _sorted_rows(c.unsure)
    n_wrong = int(c.confusion.sum() - np.trace(c.confusion))
    text = render_page(
        name=visible(Path(predictions).name), files=_num(c.classified + c.failed), classified=_num(c.classified),
        failed=_num(c.failed), labelled=labelled, accuracy=f"{c.metrics()[0]:.2f}" if labelled else None,
        glance=_glance(c, model, run), nav=_nav(c, labelled), class_names=CLASSES,
        confusion=_confusion(c, figures) if labelled else None, per_class=_per_class(c, labelled),
        misclassified={"shown": _num(len(wrong)), "total": _num(n_wrong), "figures": figures.many(wrong)}
        if labelled else None,
        unsure={"shown": _num(len(unsure)), "figures": figures.many(unsure)}, failures=_failures(c),
        run_rows=_run_rows(c, predictions, run, invert),
        model_rows=model_info if model_info is not None else model_rows(model),
        source=_shown_path(predictions), legend=_LEGEND, image_size=IMAGE_SIZE, top_k=c.top_k,
        cell_images=CELL_IMAGES, gallery_images=GALLERY_IMAGES, failed_listed=f"{FAILED_LISTED:,}")
    log.info("report: %d figures of %d files (each read and decoded once), %d bytes", drawer.figures,
             drawer.files, len(text))
    return text, drawer.figures


# ---------------------------------------------------------------------------------------------- the command

def default_output(predictions: str | Path) -> Path:
    p = Path(predictions)
    return p.with_name(p.stem + ".report.html")


def check_destination(dest: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                      outputs: Iterable[str | Path] = ()) -> Path:
    """Before a classify run (not after an hour of work): UserError unless its --report may be written at
    ``dest`` under the write policy: an existing file only with ``overwrite``, and never one of the run's
    ``inputs`` (the model, the files named) or its other ``outputs`` and each of their files (run_files.RunFiles:
    the table the report is made of, the confusion PNG, the journal, the run records, the lock), even with it."""
    # the run's own state too: a page written over its journal or run record would wreck a --resume
    others = [Path(p) for o in outputs for p in RunFiles.of(o).all()]
    check_distinct([*others, dest])
    return check_output(dest, overwrite, inputs=[*inputs, *others], what="--report")


def _check_inputs(predictions: str, model: str | Path | None, invert: str) -> None:
    if predictions.endswith(JOURNAL_SUFFIX):
        raise UserError(f"{visible(predictions)} is an interrupted run's journal; finish it with "
                        "`classify --resume` first")
    if not os.path.isfile(predictions):
        raise UserError(f"{visible(predictions)}: no such file")
    if invert not in INVERT_MODES:
        raise UserError(f"--invert must be one of {', '.join(INVERT_MODES)}")
    if model is not None and not Path(model).is_file():
        raise UserError(f"model file not found: {visible(model)}")


def _sparing(rows: Iterator[dict], ident: tuple[int, int], dest: Path, predictions: str,
             what: str) -> Iterator[dict]:
    """``rows``, refusing (UserError) one that names the file at ``dest`` (``ident``: its device and inode, links
    followed): an image the table names is an input of the report, never written over. Compared by inode, as
    check_output compares inputs: another name of it, or a link to it, is caught too."""
    for n, row in enumerate(rows, 1):
        try:
            st = os.stat(row["path"])
        except (OSError, ValueError):  # gone, or no possible name: not the page
            yield row
            continue
        if (st.st_dev, st.st_ino) == ident:
            raise UserError(f"{what} {visible(dest)} is also an input of this command (row {n} of "
                            f"{visible(predictions)} names it); write it elsewhere")
        yield row


def _identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (links followed), or None where there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def build_report(predictions: str | Path, dest: str | Path, model: str | Path | None = None,
                 invert: str = "auto", run=None, *, summary: str | Path | None = None, overwrite: bool = False,
                 what: str = "report", image_column: str | None = None) -> ReportResult:
    """Write the report of the table ``predictions`` to ``dest``, atomically, under the write policy (``files``):
    an existing ``dest`` only with ``overwrite``, never an input. ``run``: the run's summary (a ClassifySummary,
    or its JSON as a dict), for what the table does not hold; or ``summary``, the file of that JSON. ``what``
    names the output in messages ("report", "--report"). ``image_column``: the run's --image-column (the
    images of Parquet rows are read from it)."""
    t0 = time.perf_counter()
    predictions = os.fspath(predictions)
    _check_inputs(predictions, model, invert)
    if summary is not None:
        run = load_summary(summary)
    elif run is not None:
        run = check_summary(asdict(run) if is_dataclass(run) else run, "the run's summary")
    inputs = [predictions, confusion_png_path(predictions), *(p for p in (model, summary) if p is not None)]
    if run and run.get("confusion_png") and "\0" not in run["confusion_png"]:  # (a NUL: no file's name)
        inputs.append(run["confusion_png"])
    dest = check_output(dest, overwrite, inputs=inputs, what=what)  # before any work
    model_info = model_rows(model)
    check_table(predictions)
    rows = checked_rows(predictions, read_rows(predictions))
    ident = _identity(dest)  # a page there (with overwrite): no row may name it
    if ident is not None:
        rows = _sparing(rows, ident, dest, predictions, what)
    c = collect(rows)
    text, figures = render(c, predictions, model, invert, run, model_info, image_column)
    data = text.encode("utf-8")
    if len(data) > MAX_BYTES:  # the samples' bounds make this impossible; say so loudly if they ever fail
        log.warning("%s is %d bytes, over the %d bound", dest, len(data), MAX_BYTES)
    try:
        atomic_write_bytes(dest, data, overwrite)
    except OSError as e:
        raise UserError(f"cannot write {visible(dest)}: {e.strerror or e}") from None
    return ReportResult(str(dest), len(data), round(time.perf_counter() - t0, 3),
                        c.classified + c.failed, figures)
