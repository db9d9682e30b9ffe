"""The prediction table's format, apart from any run: its formats (CSV, JSONL, Parquet) and columns, the rows
encoded as the journal and stdout write them, the escaping of names that are not UTF-8, the reading back
(``JournalScan``, ``read_rows``) and the one row checker (``row_problem``) that classify, --resume and report
all use. Nothing here writes a file: the journal (journal.py), the Parquet conversion (parquet_writer.py) and
stdout (stdout_sink.py) do.

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

Rows read back (``JournalScan``, ``read_rows``) are checked for the format (``row_problem``): a row this tool
would not have written is one line naming the file and line, never a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fmnist_onnx.errors import UserError
from fmnist_onnx.spec import CLASSES, NUM_CLASSES
from fmnist_onnx.text import first_line, visible

FORMATS = ("csv", "jsonl", "parquet")
ENC = ("utf-8", "surrogateescape")  # reading: a journal of an older version may hold raw non-UTF-8 bytes


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

SURROGATE = re.compile("[\ud800-\udfff]")  # os.fsdecode's stand-ins for bytes that are not UTF-8
_ESCAPE = re.compile(r"\\(\\|x[89a-f][0-9a-f])")  # what escape_text writes and unescape_text reads


def escape_text(s: str) -> str:
    """``s`` as valid UTF-8 text, reversibly (see the module doc): unchanged unless it holds a byte that is not
    UTF-8 (a surrogate from os.fsdecode) or something that reads as an escape."""
    if not SURROGATE.search(s) and not _ESCAPE.search(s):
        return s
    return SURROGATE.sub(_escape_surrogate, s.replace("\\", "\\\\"))


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
                row = json.loads(line.decode(*ENC))
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
                rec = next(csv.reader(io.StringIO(pending.decode(*ENC), newline=""), strict=True))
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

    pq = pyarrow_parquet()
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


def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet output needs pyarrow: pip install pyarrow (or fmnist-onnx[parquet]), or "
                        "write .csv or .jsonl") from None
    return pq



# ---------------------------------------------------------------------------------------------- digests

def path_digest(path: str, as_named: bool = False) -> bytes:
    """A 64-bit digest (blake2b) of a path as a row names it: the one digest of paths, for --resume and report.
    By default, of the text itself (surrogatepass: two different texts never share a digest, whatever a crafted
    row holds): --resume compares rows with its walk by it. With ``as_named``, of the name's bytes where
    os.fsdecode made it of bytes that are not UTF-8 (surrogateescape; another lone surrogate, JSON's "\\ud800",
    by its code point as UTF-8 would): the report's sampling order, kept as its pages have always had it. The two
    differ only for names that are not UTF-8."""
    try:
        raw = path.encode("utf-8", "surrogateescape" if as_named else "surrogatepass")
    except UnicodeEncodeError:  # as_named, another lone surrogate
        raw = path.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=8).digest()
