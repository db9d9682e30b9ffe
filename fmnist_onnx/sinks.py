"""Prediction tables: CSV, JSONL or Parquet, written through a journal so that nothing is lost.

Rows go to ``<output>.partial`` as they come (appended chunk by chunk, each chunk one write(2) call, fsync
at most once a second). Only a complete run turns the journal into ``<output>``, by rename (CSV, JSONL) or
by writing the Parquet file from it then renaming: an output with its final name is always complete, and a
killed run leaves a journal that ``--resume`` continues. The journal of a Parquet output is JSONL.

Columns: path, label, index, score, then label_2, score_2 ... label_K, score_K for --top-k K, error, and
true_label: the class the source knows for the image (its ImageFolder folder, a ``.cls`` sidecar, a Parquet label
column), empty where none. Tables without true_label (written before it existed) are read too.
CSV leaves missing values empty and quotes a field with a comma, a quote, a CR or a LF (RFC 4180); JSONL
and Parquet write null (error is null on success).

File names are bytes on Linux, and not every name is UTF-8. Every output is valid UTF-8 all the same, in one
representation for the three formats: a name that is not UTF-8 is written with each byte that is not UTF-8
as ``\\xNN`` and each backslash doubled (Python's backslashreplace, made reversible). A UTF-8 name is written
as it is, unless it contains ``\\\\`` or ``\\xNN`` (NN 80-ff) itself: then it is escaped the same way, so that
the escapes are never ambiguous. ``read_rows`` undoes this and gives back the ``str`` that ``os.fsdecode``
made of the name (--resume then recognises the file). The error column is written the same way.

A write that fails mid-run (a full disk, an I/O error) is an ``OutputError``: one line, exit 4, and the
journal keeps every complete row (a chunk written in part is cut off), so that the same command with
--resume finishes once the cause is fixed. A folder that cannot be written is refused before any work.

The journal is the run's own state: created exclusively and never opened through a link (files.open_new,
files.open_existing), so a link planted at its name is refused on --resume and removed, itself, by
--overwrite. Rows read back (``JournalScan``, ``read_rows``) are checked for the format (``row_problem``): a
row this tool would not have written is one line naming the file and line, never a traceback.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fmnist_onnx import files
from fmnist_onnx.errors import UserError
from fmnist_onnx.spec import CLASSES, NUM_CLASSES
from fmnist_onnx.text import first_line, visible

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "parquet")
JOURNAL_SUFFIX = ".partial"
OUTPUT_FAILED = 4  # the exit code of an OutputError
_FSYNC_EVERY_S = 1.0
_ENC = ("utf-8", "surrogateescape")  # reading: a journal of an older version may hold raw non-UTF-8 bytes


class OutputError(UserError):
    """The output could not be written mid-run (a full disk, an I/O error): exit 4. The journal keeps the
    rows written so far; the same command with --resume finishes once the cause is fixed."""

    exit_code = OUTPUT_FAILED


@dataclass
class Row:
    """One input file's line: its top-k class indices and probabilities, or its error."""

    path: str
    indices: Sequence[int] = ()
    scores: Sequence[float] = ()
    error: str = ""
    truth: int = -1  # the true class the source knows, -1 where none


def columns(top_k: int) -> list[str]:
    extra = [c for k in range(2, top_k + 1) for c in (f"label_{k}", f"score_{k}")]
    return ["path", "label", "index", "score", *extra, "error", "true_label"]


def journal_format(fmt: str) -> str:
    """The journal's text format for an output format: its own, but JSONL for Parquet (written at the end)."""
    return "jsonl" if fmt == "parquet" else fmt


def journal_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + JOURNAL_SUFFIX)


def format_for(output: str, fmt: str | None) -> str:
    """The table format: the output's suffix, else --format; '-' (stdout) is CSV. A --format that says
    otherwise than the suffix, or than stdout's CSV, is refused rather than written under the wrong name."""
    if output == "-":
        if fmt not in (None, "csv"):
            raise UserError(f"--format {fmt}: -o - writes CSV only; write {fmt} to a file, e.g. -o preds.{fmt}")
        return "csv"
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        if fmt not in (None, suffix):
            raise UserError(f"--output {output} is a .{suffix} file but --format says {fmt}; drop --format or "
                            f"name the output .{fmt}")
        return suffix
    if fmt:
        return fmt
    raise UserError(f"--output {output}: cannot tell the format from the suffix; use .csv, .jsonl or .parquet, "
                    "or --format")


# ---------------------------------------------------------------------------------------------- text

_SURROGATE = re.compile("[\ud800-\udfff]")  # os.fsdecode's stand-ins for bytes that are not UTF-8
_ESCAPE = re.compile(r"\\(\\|x[89a-f][0-9a-f])")  # what escape_text writes and unescape_text reads


def escape_text(s: str) -> str:
    """``s`` as valid UTF-8 text, reversibly (see the module doc): unchanged unless it holds a byte that is not
    UTF-8 (a surrogate from os.fsdecode) or something that reads as an escape."""
    if not _SURROGATE.search(s) and not _ESCAPE.search(s):
        return s
    return _SURROGATE.sub(_escape_surrogate, s.replace("\\", "\\\\"))


def _escape_surrogate(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # os.fsdecode (surrogateescape) made it of the byte c - 0xdc00
        return f"\\x{c - 0xDC00:02x}"
    return f"\\u{c:04x}"  # a lone surrogate from elsewhere (not a POSIX file name): readable, not reversed


def unescape_text(s: str) -> str:
    """The inverse of ``escape_text``."""
    if "\\" not in s:
        return s
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), s)


# ---------------------------------------------------------------------------------------------- encoding

def _score(s: float) -> float:
    return float(f"{s:.6g}")


_CSV_QUOTE = re.compile(r'[,"\r\n]')
_CSV_SPECIAL = re.compile(r'[,"\r\n\\' + "\ud800-\udfff]")  # a path without these is written as it is


def _csv_text(s: str) -> str:
    """A text field: escaped (see the module doc), then quoted where the csv module's readers need it."""
    s = escape_text(s)
    return '"' + s.replace('"', '""') + '"' if _CSV_QUOTE.search(s) else s


def _csv_line(row: Row, top_k: int) -> str:
    rec = [_csv_text(row.path)]
    if row.error:
        rec += [""] * (3 + 2 * (top_k - 1))
    else:
        rec += [CLASSES[row.indices[0]], str(row.indices[0]), f"{row.scores[0]:.6g}"]
        for i, s in zip(row.indices[1:top_k], row.scores[1:top_k], strict=True):
            rec += [CLASSES[i], f"{s:.6g}"]
    rec.append(_csv_text(row.error))
    rec.append(CLASSES[row.truth] if row.truth >= 0 else "")
    return ",".join(rec) + "\n"


def _json_record(row: Row, top_k: int) -> dict:
    rec: dict = {"path": escape_text(row.path)}
    ok = not row.error
    rec["label"] = CLASSES[row.indices[0]] if ok else None
    rec["index"] = int(row.indices[0]) if ok else None
    rec["score"] = _score(row.scores[0]) if ok else None
    for k in range(2, top_k + 1):
        rec[f"label_{k}"] = CLASSES[row.indices[k - 1]] if ok else None
        rec[f"score_{k}"] = _score(row.scores[k - 1]) if ok else None
    rec["error"] = escape_text(row.error) if row.error else None
    rec["true_label"] = CLASSES[row.truth] if row.truth >= 0 else None
    return rec


def encode(rows: Sequence[Row], fmt: str, top_k: int) -> bytes:
    """Rows as the text of a CSV (no header) or JSONL file: UTF-8, whatever the file names."""
    if fmt == "csv":
        if top_k == 1:  # the common case, without a function call per row; paths that need more go through one
            lines = [f"{r.path},{CLASSES[r.indices[0]]},{r.indices[0]},{r.scores[0]:.6g},,{_TRUE[r.truth]}\n"
                     if not r.error and not _CSV_SPECIAL.search(r.path) else _csv_line(r, 1) for r in rows]
        else:
            lines = [_csv_line(r, top_k) for r in rows]
        return "".join(lines).encode()
    lines = (json.dumps(_json_record(r, top_k), ensure_ascii=False) for r in rows)
    return "".join(line + "\n" for line in lines).encode()


def encode_csv_top1(paths: Sequence[str], indices: Sequence[int], scores: Sequence[float],
                    truth: Sequence[int]) -> bytes | None:
    """``encode(rows, "csv", 1)`` for rows that were all classified, from plain lists (no Row per file), or
    None where a path needs quoting or escaping (then ``encode`` it is)."""
    if any(map(_CSV_SPECIAL.search, paths)):
        return None
    lines = [f"{p},{CLASSES[k]},{k},{s:.6g},,{_TRUE[t]}\n" for p, k, s, t in zip(paths, indices, scores, truth,
                                                                                 strict=True)]
    return "".join(lines).encode()


_TRUE = {-1: "", **dict(enumerate(CLASSES))}  # a true class as the CSV writes it


def csv_header(top_k: int) -> bytes:
    return (",".join(columns(top_k)) + "\n").encode()


# ---------------------------------------------------------------------------------------------- reading

_CLASS_NUMBER = re.compile(r"[0-9]{1,4}")  # what the CSV writer puts in the index column (and a little more)


def _csv_int(text: str) -> int | str | None:
    """An index field: None where empty, an int where it is digits, else the text itself (``row_problem``
    names it; int() would also take " 3", "+3" and "1_0")."""
    if not text:
        return None
    return int(text) if _CLASS_NUMBER.fullmatch(text) else text


def _csv_float(text: str) -> float | str | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _parse_csv_row(rec: list[str], cols: list[str]) -> dict:
    """A CSV record as the row it stands for; values that do not parse are kept as text for ``row_problem``."""
    d = dict(zip(cols, rec, strict=True))
    for c in cols:
        if c == "index":
            d[c] = _csv_int(d[c])
        elif c.startswith("score"):
            d[c] = _csv_float(d[c])
        elif c != "path" and c != "error" and not d[c]:
            d[c] = None
    d["path"] = unescape_text(d["path"])
    d["error"] = unescape_text(d["error"]) if d.get("error") else None
    return d


def _unescape_row(row: dict) -> dict:
    row["path"] = unescape_text(row["path"])
    if row.get("error"):
        row["error"] = unescape_text(row["error"])
    return row


def top_k_of(cols: Sequence[object]) -> int | None:
    """The --top-k of a table with these columns (with true_label, or without: an earlier version's), or None
    where they are not a classify table's."""
    cols = list(cols)
    if cols and cols[-1] == "true_label":
        cols = cols[:-1]
    k = (len(cols) - 3) // 2
    return k if 1 <= k <= NUM_CLASSES and cols == columns(k)[:-1] else None


def _shown(value: object) -> str:
    """A value from a file, for a message: its repr, short, with control characters visible."""
    text = repr(value)
    return visible(text if len(text) <= 40 else text[:37] + "...")


def _is_score(s: object) -> bool:
    return type(s) in (int, float) and 0.0 <= s <= 1.0  # NaN fails both comparisons; bool is not int here


def row_problem(row: dict, top_k: int) -> str | None:
    """Why ``row`` (as read back, with columns(top_k)) is not a row this tool writes, or None: a path; then
    either an error and no class, or a class index 0-9 with its label, a score in [0, 1], and top-k distinct
    classes with their scores. Checked for every row read back: --resume continues only rows it can trust, and
    a report or summary counts only such rows."""
    path, error = row["path"], row["error"]
    if type(path) is not str or not path:
        return f"has path {_shown(path)}, not a file name"
    if row.get("true_label") is not None and row["true_label"] not in CLASSES:
        return f"has true_label {_shown(row['true_label'])}, not a class name"
    if error is not None and type(error) is not str:
        return f"has error {_shown(error)}, not a text"
    values = ["label", "index", "score", *(c for k in range(2, top_k + 1) for c in (f"label_{k}", f"score_{k}"))]
    if error:
        extra = next((c for c in values if row[c] is not None), None)
        return None if extra is None else f"has an error and a {extra} ({_shown(row[extra])})"
    index = row["index"]
    if type(index) is not int or not 0 <= index < NUM_CLASSES:
        return f"has index {_shown(index)}, not a class number 0-{NUM_CLASSES - 1}"
    if row["label"] != CLASSES[index]:
        return f"has label {_shown(row['label'])} for index {index} ({CLASSES[index]})"
    seen = {CLASSES[index]}
    for label, score in [("label", "score")] + [(f"label_{k}", f"score_{k}") for k in range(2, top_k + 1)]:
        if not _is_score(row[score]):
            return f"has {score} {_shown(row[score])}, not a number between 0 and 1"
        if label != "label":
            if row[label] not in CLASSES or row[label] in seen:
                return f"has {label} {_shown(row[label])}, not one more class name"
            seen.add(row[label])
    return None


class JournalScan:
    """Iterates over the complete rows of a journal or finished CSV/JSONL output, streaming (memory stays
    flat), each checked (``row_problem``): a row this tool would not have written is a UserError naming the
    line. ``source``: a path, or a file descriptor open on the file (read from its start, left open: a journal
    opened without following links). Afterwards: ``good`` is the byte length of the rows (a torn tail after it
    is to be dropped), ``columns`` the CSV header or the first JSON row's keys (None when there is no row),
    ``rows`` the count; during it, ``line`` is the line where the row last given starts."""

    def __init__(self, source: Path | int, fmt: str, hint: str = "") -> None:
        self.source, self.fmt = source, fmt
        self.path = Path(source) if not isinstance(source, int) else None
        self.name = str(self.path) if self.path is not None else f"file descriptor {source}"
        self.hint = hint  # what to do about damage, in the messages
        self.good, self.rows, self.columns, self.line = 0, 0, None, 0
        self.top_k: int | None = None

    def _open(self):
        if self.path is not None:
            return open(self.path, "rb")
        os.lseek(self.source, 0, os.SEEK_SET)
        return open(self.source, "rb", closefd=False)

    def _lines(self) -> Iterator[bytes]:
        """Lines that end with a newline: a killed writer leaves at most a torn tail without one."""
        with self._open() as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield line

    def _damaged(self, line_no: int, why: str) -> UserError:
        hint = f" ({self.hint})" if self.hint else ""
        return UserError(f"{visible(self.name)}: line {line_no} {why}; the file is damaged{hint}")

    def _columns(self, cols: list, line_no: int) -> None:
        self.columns, self.top_k = cols, top_k_of(cols)
        if self.top_k is None:
            raise self._damaged(line_no, f"has the columns {_shown(cols)}, not a classify table's")

    def _checked(self, row: dict, line_no: int) -> dict:
        why = row_problem(row, self.top_k)
        if why:
            raise self._damaged(line_no, why)
        self.rows += 1
        self.line = line_no
        return row

    def __iter__(self) -> Iterator[dict]:
        yield from self._csv() if self.fmt == "csv" else self._jsonl()

    def _jsonl(self) -> Iterator[dict]:
        pending: int | None = None  # a line that is not JSON is only forgiven if it is the last one (torn)
        for n, line in enumerate(self._lines(), 1):
            if pending is not None:
                raise self._damaged(pending, "is not JSON")
            try:
                row = json.loads(line.decode(*_ENC))
            except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
                pending = n
                continue
            if type(row) is not dict:
                raise self._damaged(n, f"is {type(row).__name__} JSON, not an object")
            if self.columns is None:
                self._columns(list(row), n)
            elif list(row) != self.columns:
                raise self._damaged(n, f"has the fields {_shown(list(row))}, expected {_shown(self.columns)}")
            if type(row["path"]) is str:
                _unescape_row(row)
            row = self._checked(row, n)
            self.good += len(line)
            yield row

    def _csv(self) -> Iterator[dict]:
        # a record may span lines (a quoted path with a newline): it is complete when its quotes pair up
        pending, line_no, start = b"", 0, 1
        for line in self._lines():
            line_no += 1
            pending += line
            if pending.count(b'"') % 2:
                continue
            try:
                rec = next(csv.reader(io.StringIO(pending.decode(*_ENC), newline=""), strict=True))
            except csv.Error as e:  # e.g. a CR outside quotes, as earlier versions wrote it, or a NUL
                raise self._damaged(start, f"cannot be read as CSV ({e})") from None
            row = None
            if self.columns is None:
                self._columns(rec, start)
            elif len(rec) != len(self.columns):
                raise self._damaged(start, f"has {len(rec)} fields, expected {len(self.columns)}")
            else:
                row = self._checked(_parse_csv_row(rec, self.columns), start)
            self.good += len(pending)
            pending, start = b"", line_no + 1
            if row is not None:
                yield row


def read_rows(path: str | Path) -> Iterator[dict]:
    """The rows of a finished output (CSV, JSONL or Parquet), as dicts with None for missing values and
    paths as ``os.fsdecode`` gives them, each checked (``row_problem``): a table this tool would not have
    written is a UserError naming the line (the row, in Parquet). A file without a known suffix (--format) is
    recognised by its start."""
    path = Path(path)
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        with open(path, "rb") as f:
            start = f.read(4)
        fmt = "parquet" if start == b"PAR1" else "jsonl" if start.startswith(b"{") else "csv"
    if fmt == "parquet":
        yield from _parquet_rows(path)
        return
    yield from JournalScan(path, fmt)


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow as pa

    pq = _pyarrow_parquet()
    try:
        table = pq.ParquetFile(path)
        top_k = top_k_of(table.schema_arrow.names)
        if top_k is None:
            raise UserError(f"{visible(path)} has the columns {_shown(table.schema_arrow.names)}, not a classify "
                            "table's")
        n = 0
        for batch in table.iter_batches():
            for row in batch.to_pylist():
                n += 1
                if type(row["path"]) is str:
                    _unescape_row(row)
                why = row_problem(row, top_k)
                if why:
                    raise UserError(f"{visible(path)}: row {n} {why}; the file is damaged")
                yield row
    except pa.ArrowException as e:
        raise UserError(f"{visible(path)}: not a readable Parquet file ({first_line(e)})") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet output needs pyarrow: pip install pyarrow (or fmnist-onnx[parquet]), or "
                        "write .csv or .jsonl") from None
    return pq


# ---------------------------------------------------------------------------------------------- writing

def _why(e: OSError) -> str:
    """The OS's words for an error ("No space left on device"), also for pyarrow's wordier OSErrors."""
    return os.strerror(e.errno) if e.errno else str(e)


def _what_to_fix(e: OSError) -> str:
    return "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix that"


_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket"}


def _check_place(output: Path) -> None:
    """UserError unless ``output`` (and its journal) can be written there: a file name in a folder that
    exists and is writable, and no device, FIFO or socket by that name (only regular files are replaced; a
    symbolic link is replaced itself, never followed)."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name")
    for path in (output, journal_path(output)):
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # not there
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise UserError(f"--output {output}: {path} is {kind}; only regular files are written or replaced "
                            "(for stdout, use -o -)")
    files.check_folder(output, f"--output {output}")  # exists, and can be written


def remove_own(path: Path) -> None:
    """Remove a run's own file (a journal, a run record): a symbolic link there is removed itself, never its
    target (unlink(2) does not follow links)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UserError(f"cannot remove {path}: {_why(e)}") from None


class RowRefused(Exception):
    """Raised by an ``on_previous_row`` callback: the row is not one this run may continue (why, in words).
    The journal is left as it was; the message names its line."""


class JournalSink:
    """Appends rows to ``<output>.partial``; ``finish`` makes the final output. Use ``open`` to create it."""

    def __init__(self, output: Path, fmt: str, top_k: int, fd: int, size: int, replace: bool = True) -> None:
        self.output, self.fmt, self.top_k = output, fmt, top_k
        self.encoding = journal_format(fmt)
        self.journal = journal_path(output)
        self.fd = fd  # open for reading too: the Parquet output is written from it
        self.size = size  # bytes of complete chunks in the journal: a write that fails is cut back to it
        self.replace = replace  # whether finish may replace a file at the output's name
        self._synced = time.monotonic()

    @classmethod
    def open(cls, output: str | Path, fmt: str, top_k: int, resume: bool = False, overwrite: bool = False,
             on_previous_row: Callable[[dict], None] | None = None) -> JournalSink:
        """Refuses to clobber a finished output or an interrupted run's journal unless ``overwrite`` (which
        removes the journal, a link there included, never its target); with ``resume``, continues the journal
        after its last complete row, calling ``on_previous_row`` for each row already there (the caller skips
        those files and counts them; it raises RowRefused for a row it cannot continue). A journal that cannot
        be created or opened, or is a link, is a UserError (exit 2): no work has been done yet."""
        output = Path(output)
        journal = journal_path(output)
        if fmt == "parquet":
            _pyarrow_parquet()  # fail now, not after an hour of work
        _check_place(output)
        if not overwrite and not resume:
            cls.check_free(output)
        if resume and not os.path.lexists(journal) and os.path.lexists(output):
            raise UserError(f"{output} is already complete; use --overwrite to classify again")
        try:
            if overwrite:
                remove_own(journal)
            if resume and os.path.lexists(journal):
                return cls._reopen(output, fmt, top_k, on_previous_row)
            fd = files.open_new(journal, os.O_RDWR)
        except FileExistsError:  # created meanwhile, by something else than a run (which holds the lock)
            raise UserError(f"{journal} appeared meanwhile; use --resume or --overwrite") from None
        except OSError as e:
            raise UserError(f"cannot write {journal}: {_why(e)}") from None
        header = csv_header(top_k) if fmt == "csv" else b""
        try:
            os.write(fd, header)  # a few bytes: all or nothing
            files.fsync_dir(journal.parent)
        except OSError as e:
            os.close(fd)
            journal.unlink(missing_ok=True)  # nothing in it yet
            raise UserError(f"cannot write {journal}: {_why(e)}") from None
        return cls(output, fmt, top_k, fd, len(header), replace=overwrite)

    @classmethod
    def _reopen(cls, output: Path, fmt: str, top_k: int,
                on_previous_row: Callable[[dict], None] | None) -> JournalSink:
        """--resume: the journal after its last complete row (a torn tail is dropped). Every row is checked
        first (the scan's own checks, then ``on_previous_row``'s): until then nothing is changed."""
        journal = journal_path(output)
        fd = files.open_existing(journal, os.O_RDWR)  # a link is refused: never read or written through one
        try:
            good, cols = cls._scan(fd, journal, fmt, top_k, on_previous_row)
            os.ftruncate(fd, good)  # drop a torn tail: new rows must start on a fresh line
            os.lseek(fd, good, os.SEEK_SET)
            if cols is None and fmt == "csv":
                good += os.write(fd, csv_header(top_k))
        except BaseException:
            os.close(fd)
            raise
        return cls(output, fmt, top_k, fd, good)

    @staticmethod
    def _scan(fd: int, journal: Path, fmt: str, top_k: int,
              on_previous_row: Callable[[dict], None] | None) -> tuple[int, list | None]:
        """(bytes of complete rows, columns) of the journal open at ``fd``, its rows checked."""
        expected = columns(top_k)
        scan = JournalScan(fd, journal_format(fmt), hint="use --overwrite to start over")
        scan.name = str(journal)
        for row in scan:
            if scan.columns != expected:
                break
            if on_previous_row is not None:
                try:
                    on_previous_row(row)
                except RowRefused as e:
                    raise UserError(f"--resume: {visible(journal)}: line {scan.line} {e}; the journal is left as "
                                    "it was (use --overwrite to start over)") from None
        if scan.columns is not None and scan.columns != expected:
            raise UserError(f"{journal} has columns {', '.join(scan.columns)}, this run would write "
                            f"{', '.join(expected)}; resume with the same --top-k, or use --overwrite")
        log.info("resuming %s: %d rows done", journal, scan.rows)
        return scan.good, scan.columns

    @staticmethod
    def check_free(output: str | Path) -> None:
        """UserError unless ``output`` can be written without clobbering a finished or interrupted run (and
        its folder can be written at all: checked before any work). A link counts as a file."""
        output = Path(output)
        journal = journal_path(output)
        _check_place(output)
        if os.path.lexists(output):
            raise UserError(f"{output} exists; use --overwrite to replace it")
        if os.path.lexists(journal):
            raise UserError(f"{journal} is an interrupted run's output; use --resume to continue it, or "
                            "--overwrite to start over")

    @staticmethod
    def check_writable(output: str | Path) -> None:
        """UserError unless the folder of ``output`` can be written and ``output`` is no device or FIFO: for a
        caller that writes beside the output before ``open`` (the check is cheap: no file is created)."""
        _check_place(Path(output))

    def _failed(self, e: OSError) -> OutputError:
        return OutputError(f"cannot write {self.journal}: {_why(e)}. The rows written so far are kept there: "
                           f"{_what_to_fix(e)} and run the same command with --resume to finish")

    def write(self, rows: Sequence[Row]) -> None:
        self.write_encoded(encode(rows, self.encoding, self.top_k))

    def write_encoded(self, data: bytes) -> None:
        """Append rows already encoded (``encode(rows, self.encoding, top_k)``, perhaps in a worker process):
        one write call, so a killed process leaves whole chunks (a crash: at most a torn line). A write that
        fails (a full disk) is cut back to the last whole chunk and raised as an OutputError."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            self.size += len(data)
            if time.monotonic() - self._synced > _FSYNC_EVERY_S:
                os.fsync(self.fd)
                self._synced = time.monotonic()
        except OSError as e:
            try:  # part of a chunk would end in a torn row (--resume would drop it): keep whole chunks only
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            raise self._failed(e) from None

    def finish(self) -> Path:
        """The journal becomes the output: complete, or not there at all (then the journal stays, complete,
        and --resume writes the output from it). A link at the output's name is replaced itself, never its
        target; a file there is replaced only where the run may (``--overwrite``, or the --resume of one)."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise self._failed(e) from None
        try:
            if self.fmt == "parquet":
                with open(self.fd, "rb", closefd=False) as src:  # the journal as opened: never by its name again
                    src.seek(0)
                    files.atomic_write(self.output, lambda f: _jsonl_to_parquet(src, f, self.top_k), self.replace)
                os.unlink(self.journal)
            elif self.replace:
                os.replace(self.journal, self.output)
            else:
                self._link_output()
        except OSError as e:
            raise OutputError(f"cannot write {self.output}: {_why(e)}. All its rows are in {self.journal}: "
                              f"{_what_to_fix(e)} and run the same command with --resume to write it") from None
        finally:
            os.close(self.fd)
            self.fd = -1
        files.fsync_dir(self.output.parent)
        return self.output

    def _link_output(self) -> None:
        """The journal gets the output's name only if nothing has it (link(2) does not replace)."""
        try:
            os.link(self.journal, self.output, follow_symlinks=False)
        except FileExistsError:
            raise UserError(f"{self.output} appeared during the run; all its rows are in {self.journal}: move that "
                            "file away and run the same command with --resume") from None
        os.unlink(self.journal)

    def close(self) -> None:
        """Stop writing (the run was interrupted, or a write failed): the journal stays for --resume. Never
        raises: it runs while another exception is on its way out."""
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as e:
                log.warning("cannot sync %s: %s", self.journal, _why(e))
            finally:
                os.close(self.fd)
                self.fd = -1


def _jsonl_to_parquet(journal: BinaryIO, dest: BinaryIO, top_k: int, rows_per_group: int = 65536) -> None:
    """Stream the JSONL journal into a Parquet file, one row group per ``rows_per_group`` rows. Text is
    copied as the journal holds it, escapes included (see the module doc): Parquet strings are UTF-8 too."""
    import pyarrow as pa

    pq = _pyarrow_parquet()
    fields = []
    for c in columns(top_k):
        kind = pa.int64() if c == "index" else pa.float64() if c.startswith("score") else pa.string()
        fields.append(pa.field(c, kind))
    schema = pa.schema(fields)
    names = schema.names
    writer_empty = [True]

    def flush(batch: list[dict]) -> None:
        cols = {n: [r.get(n) for r in batch] for n in names}
        # a journal of an older version may hold raw non-UTF-8 bytes (surrogates here): escape those alone
        cols["path"] = [escape_text(p) if _SURROGATE.search(p) else p for p in cols["path"]]
        writer.write_table(pa.table(cols, schema=schema))
        writer_empty[0] = False

    with pq.ParquetWriter(dest, schema) as writer:
        batch: list[dict] = []
        for line in journal:
            if not line.endswith(b"\n"):
                break  # a torn tail (--resume cuts it; finish comes after a complete write)
            batch.append(json.loads(line.decode(*_ENC)))
            if len(batch) >= rows_per_group:
                flush(batch)
                batch = []
        if batch or writer_empty[0]:  # an empty table still has its columns
            flush(batch)


class StdoutSink:
    """CSV on stdout, flushed chunk by chunk (``-o -``): no journal, no resume. A reader that goes away
    (``| head``) raises BrokenPipeError, which the CLI ends quietly; any other write error (``> /dev/full``) is
    an OutputError."""

    encoding = "csv"

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        if sys.stdout is None:  # started with stdout closed (>&-)
            raise UserError("stdout is closed: write the table to a file with -o")
        self.out = sys.stdout.buffer
        self._put(csv_header(top_k), flush=False)

    def write(self, rows: Sequence[Row]) -> None:
        self.write_encoded(encode(rows, "csv", self.top_k))

    def write_encoded(self, data: bytes) -> None:
        self._put(data)

    def _put(self, data: bytes, flush: bool = True) -> None:
        try:
            self.out.write(data)
            if flush:
                self.out.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            self._discard()
            raise OutputError(f"cannot write to stdout: {_why(e)}. Stdout keeps no journal: write to a file "
                              "(-o preds.csv) to keep the rows and be able to --resume") from None

    def _discard(self) -> None:
        """Rows still buffered would fail again when Python flushes stdout at exit (a second message, and
        exit 120): send them to /dev/null instead."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def finish(self) -> str:
        self._put(b"")
        return "-"

    def close(self) -> None:
        try:
            self.out.flush()
        except (BrokenPipeError, ValueError):  # the reader went away (the CLI says nothing), or closed already
            pass
        except OSError:
            self._discard()
