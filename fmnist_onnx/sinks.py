"""Prediction tables: CSV, JSONL or Parquet, written through a journal so that nothing is lost.

Rows go to ``<output>.partial`` as they come (appended chunk by chunk, each chunk one write(2) call, fsync
at most once a second). Only a complete run turns the journal into ``<output>``, by rename (CSV, JSONL) or
by writing the Parquet file from it then renaming: an output with its final name is always complete, and a
killed run leaves a journal that ``--resume`` continues. The journal of a Parquet output is JSONL.

Columns: path, label, index, score, then label_2, score_2 ... label_K, score_K for --top-k K, and error.
CSV leaves missing values empty; JSONL and Parquet write null (error is null on success).
Paths that are not valid UTF-8 (possible on Linux) are written byte for byte in CSV and JSONL.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fmnist_onnx.errors import UserError
from fmnist_onnx.spec import CLASSES

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "parquet")
JOURNAL_SUFFIX = ".partial"
_FSYNC_EVERY_S = 1.0
_ENC = ("utf-8", "surrogateescape")  # file names are bytes on Linux: keep them exactly


@dataclass
class Row:
    """One input file's line: its top-k class indices and probabilities, or its error."""

    path: str
    indices: Sequence[int] = ()
    scores: Sequence[float] = ()
    error: str = ""


def columns(top_k: int) -> list[str]:
    extra = [c for k in range(2, top_k + 1) for c in (f"label_{k}", f"score_{k}")]
    return ["path", "label", "index", "score", *extra, "error"]


def journal_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + JOURNAL_SUFFIX)


def format_for(output: str, fmt: str | None) -> str:
    """The table format: --format, else the output's suffix; '-' (stdout) is CSV."""
    if fmt:
        return fmt
    if output == "-":
        return "csv"
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise UserError(f"--output {output}: cannot tell the format from the suffix; use .csv, .jsonl or .parquet, "
                    "or --format")


# ---------------------------------------------------------------------------------------------- encoding

def _score(s: float) -> float:
    return float(f"{s:.6g}")


def _csv_record(row: Row, top_k: int) -> list:
    rec: list = [row.path]
    if row.error:
        rec += [""] * (3 + 2 * (top_k - 1))
    else:
        rec += [CLASSES[row.indices[0]], row.indices[0], f"{row.scores[0]:.6g}"]
        for i, s in zip(row.indices[1:top_k], row.scores[1:top_k], strict=True):
            rec += [CLASSES[i], f"{s:.6g}"]
    rec.append(row.error)
    return rec


_NEEDS_QUOTES = re.compile(r'[,"\r\n]')


def _csv_line(row: Row, top_k: int) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(_csv_record(row, top_k))
    return buf.getvalue()


def _json_record(row: Row, top_k: int) -> dict:
    rec: dict = {"path": row.path}
    ok = not row.error
    rec["label"] = CLASSES[row.indices[0]] if ok else None
    rec["index"] = int(row.indices[0]) if ok else None
    rec["score"] = _score(row.scores[0]) if ok else None
    for k in range(2, top_k + 1):
        rec[f"label_{k}"] = CLASSES[row.indices[k - 1]] if ok else None
        rec[f"score_{k}"] = _score(row.scores[k - 1]) if ok else None
    rec["error"] = row.error or None
    return rec


def encode(rows: Sequence[Row], fmt: str, top_k: int) -> bytes:
    """Rows as the text of a CSV (no header) or JSONL file."""
    if fmt == "csv":
        if top_k == 1:  # the common case, 5x faster than the csv module; paths that need quoting go through it
            lines = [f"{r.path},{CLASSES[r.indices[0]]},{r.indices[0]},{r.scores[0]:.6g},\n"
                     if not r.error and not _NEEDS_QUOTES.search(r.path) else _csv_line(r, top_k) for r in rows]
            return "".join(lines).encode(*_ENC)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(_csv_record(r, top_k) for r in rows)
        return buf.getvalue().encode(*_ENC)
    lines = (json.dumps(_json_record(r, top_k), ensure_ascii=False) for r in rows)
    return "".join(line + "\n" for line in lines).encode(*_ENC)


def csv_header(top_k: int) -> bytes:
    return (",".join(columns(top_k)) + "\n").encode()


# ---------------------------------------------------------------------------------------------- reading

def _parse_csv_row(rec: list[str], cols: list[str]) -> dict:
    d = dict(zip(cols, rec, strict=True))
    for c in cols:
        if c == "index":
            d[c] = int(d[c]) if d[c] else None
        elif c.startswith("score"):
            d[c] = float(d[c]) if d[c] else None
        elif c != "path" and c != "error" and not d[c]:
            d[c] = None
    d["error"] = d.get("error") or None
    return d


class JournalScan:
    """Iterates over the complete rows of a journal or finished CSV/JSONL output, streaming (memory stays
    flat). Afterwards: ``good`` is the byte length of those rows (a torn tail after it is to be dropped),
    ``columns`` the CSV header or the first JSON row's keys (None when there is no row), ``rows`` the count."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = Path(path), fmt
        self.good, self.rows, self.columns = 0, 0, None

    def _lines(self) -> Iterator[bytes]:
        """Lines that end with a newline: a killed writer leaves at most a torn tail without one."""
        with open(self.path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield line

    def _damaged(self, line_no: int, why: str) -> UserError:
        return UserError(f"{self.path}: line {line_no} {why}; the file is damaged (use --overwrite to start over)")

    def __iter__(self) -> Iterator[dict]:
        if self.fmt == "csv":
            yield from self._csv()
            return
        pending: tuple[int, bytes] | None = None  # a bad line is only forgiven if it is the last one
        for n, line in enumerate(self._lines(), 1):
            if pending is not None:
                raise self._damaged(pending[0], "is not JSON")
            try:
                row = json.loads(line.decode(*_ENC))
            except ValueError:
                pending = (n, line)
                continue
            if self.columns is None:
                self.columns = list(row)
            self.good += len(line)
            self.rows += 1
            yield row

    def _csv(self) -> Iterator[dict]:
        # a record may span lines (a quoted path with a newline): it is complete when its quotes pair up
        pending, line_no = b"", 0
        for line in self._lines():
            line_no += 1
            pending += line
            if pending.count(b'"') % 2:
                continue
            rec = next(csv.reader(io.StringIO(pending.decode(*_ENC)), strict=True))
            if self.columns is None:
                self.columns = rec
            elif len(rec) != len(self.columns):
                raise self._damaged(line_no, f"has {len(rec)} fields, expected {len(self.columns)}")
            else:
                self.rows += 1
                yield _parse_csv_row(rec, self.columns)
            self.good += len(pending)
            pending = b""


def read_rows(path: str | Path) -> Iterator[dict]:
    """The rows of a finished output (CSV, JSONL or Parquet), as dicts with None for missing values."""
    path = Path(path)
    fmt = format_for(str(path), None)
    if fmt == "parquet":
        pq = _pyarrow_parquet()
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
        return
    yield from JournalScan(path, fmt)


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet output needs pyarrow: pip install pyarrow (or fmnist-onnx[parquet]), or "
                        "write .csv or .jsonl") from None
    return pq


# ---------------------------------------------------------------------------------------------- writing

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_place(output: Path) -> None:
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name")
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: folder {output.parent} does not exist")


class JournalSink:
    """Appends rows to ``<output>.partial``; ``finish`` makes the final output. Use ``open`` to create it."""

    def __init__(self, output: Path, fmt: str, top_k: int, fd: int) -> None:
        self.output, self.fmt, self.top_k = output, fmt, top_k
        self.encoding = "jsonl" if fmt == "parquet" else fmt  # the journal's text format
        self.journal = journal_path(output)
        self.fd = fd
        self._synced = time.monotonic()

    @classmethod
    def open(cls, output: str | Path, fmt: str, top_k: int, resume: bool = False, overwrite: bool = False,
             on_previous_row: Callable[[dict], None] | None = None) -> JournalSink:
        """Refuses to clobber a finished output or an interrupted run's journal unless ``overwrite``;
        with ``resume``, continues the journal after its last complete row, calling ``on_previous_row``
        for each row already there (the caller skips those files and counts them)."""
        output = Path(output)
        journal = journal_path(output)
        jfmt = "jsonl" if fmt == "parquet" else fmt
        if fmt == "parquet":
            _pyarrow_parquet()  # fail now, not after an hour of work
        _check_place(output)
        if overwrite:
            journal.unlink(missing_ok=True)
        elif not resume:
            cls.check_free(output)
        expected = columns(top_k)
        if resume and not journal.exists() and output.exists():
            raise UserError(f"{output} is already complete; use --overwrite to classify again")
        if resume and journal.exists():
            scan = JournalScan(journal, jfmt)
            for row in scan:
                if scan.rows == 1 and scan.columns != expected:
                    break
                if on_previous_row is not None:
                    on_previous_row(row)
            good, cols = scan.good, scan.columns
            if cols is not None and cols != expected:
                raise UserError(f"{journal} has columns {', '.join(cols)}, this run would write "
                                f"{', '.join(expected)}; resume with the same --top-k, or use --overwrite")
            fd = os.open(journal, os.O_WRONLY)
            os.truncate(journal, good)  # drop a torn tail: new rows must start on a fresh line
            os.lseek(fd, good, os.SEEK_SET)
            if cols is None and jfmt == "csv":
                os.write(fd, csv_header(top_k))
            log.info("resuming %s: %d rows done", journal, scan.rows)
        else:
            fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            if jfmt == "csv":
                os.write(fd, csv_header(top_k))
            _fsync_dir(journal.parent)
        return cls(output, fmt, top_k, fd)

    @staticmethod
    def check_free(output: str | Path) -> None:
        """UserError unless ``output`` can be written without clobbering a finished or interrupted run."""
        output = Path(output)
        journal = journal_path(output)
        _check_place(output)
        if output.exists():
            raise UserError(f"{output} exists; use --overwrite to replace it")
        if journal.exists():
            raise UserError(f"{journal} is an interrupted run's output; use --resume to continue it, or "
                            "--overwrite to start over")

    def write(self, rows: Sequence[Row]) -> None:
        self.write_encoded(encode(rows, self.encoding, self.top_k))

    def write_encoded(self, data: bytes) -> None:
        """Append rows already encoded (``encode(rows, self.encoding, top_k)``, perhaps in a worker process):
        one write call, so a killed process leaves whole chunks (a crash: at most a torn line)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        if time.monotonic() - self._synced > _FSYNC_EVERY_S:
            os.fsync(self.fd)
            self._synced = time.monotonic()

    def finish(self) -> Path:
        """The journal becomes the output: complete, or not there at all."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.fmt == "parquet":
            tmp = self.output.with_name(f".{self.output.name}.tmp{os.getpid()}")
            try:
                _jsonl_to_parquet(self.journal, tmp, self.top_k)
                os.replace(tmp, self.output)
            finally:
                tmp.unlink(missing_ok=True)
            self.journal.unlink()
        else:
            os.replace(self.journal, self.output)
        _fsync_dir(self.output.parent)
        return self.output

    def close(self) -> None:
        """Stop writing (the run was interrupted): the journal stays for --resume."""
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


def _jsonl_to_parquet(journal: Path, dest: Path, top_k: int, rows_per_group: int = 65536) -> None:
    """Stream the JSONL journal into a Parquet file, one row group per ``rows_per_group`` rows."""
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
        # Parquet strings must be valid UTF-8: a non-UTF-8 file name is written with \xNN escapes
        cols["path"] = [p.encode(*_ENC).decode("utf-8", "backslashreplace") for p in cols["path"]]
        writer.write_table(pa.table(cols, schema=schema))
        writer_empty[0] = False

    with pq.ParquetWriter(dest, schema) as writer:
        batch: list[dict] = []
        with open(journal, "rb") as f:
            for line in f:
                batch.append(json.loads(line.decode(*_ENC)))
                if len(batch) >= rows_per_group:
                    flush(batch)
                    batch = []
        if batch or writer_empty[0]:  # an empty table still has its columns
            flush(batch)


class StdoutSink:
    """CSV on stdout, flushed chunk by chunk (``-o -``): no journal, no resume."""

    encoding = "csv"

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.out = sys.stdout.buffer
        self.out.write(csv_header(top_k))

    def write(self, rows: Sequence[Row]) -> None:
        self.write_encoded(encode(rows, "csv", self.top_k))

    def write_encoded(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    def finish(self) -> str:
        self.out.flush()
        return "-"

    def close(self) -> None:
        try:
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass
