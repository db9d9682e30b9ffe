"""The journal: a prediction table written so that nothing is lost (CSV, JSONL or Parquet).

Rows go to ``<output>.partial`` as they come (appended chunk by chunk, each chunk one write(2) call, fsync
at most once a second). Only a complete run turns the journal into ``<output>``, by rename (CSV, JSONL) or
by writing the Parquet file from it then renaming (parquet_writer.py): an output with its final name is always
complete, and a killed run leaves a journal that ``--resume`` continues. The journal of a Parquet output is
JSONL. The rows' format, escapes and checks are table.py's.

A write that fails mid-run (a full disk, an I/O error) is an ``OutputError``: one line, exit 4, and the
journal keeps every complete row (a chunk written in part is cut off), so that the same command with
--resume finishes once the cause is fixed. A folder that cannot be written is refused before any work.

The journal is the run's own state: created exclusively and never opened through a link (files.open_new,
files.open_existing), so a link planted at its name is refused on --resume and removed, itself, by
--overwrite. Rows read back (``table.JournalScan``) are checked for the format (``table.row_problem``): a
row this tool would not have written is one line naming the file and line, never a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fmnist_onnx import files
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import OutputError, remove_own, why
from fmnist_onnx.parquet_writer import write_parquet
from fmnist_onnx.table import JournalScan, Row, columns, csv_header, encode, journal_format, pyarrow_parquet
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".partial"
_FSYNC_EVERY_S = 1.0


def journal_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + JOURNAL_SUFFIX)


def _what_to_fix(e: OSError) -> str:
    return "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix that"


def check_writable(output: str | Path) -> None:
    """UserError unless the folder of ``output`` can be written and ``output`` (or its journal) is no device or
    FIFO: for a caller that writes beside the output before ``JournalSink.open`` (the check is cheap: no file is
    created)."""
    output = Path(output)
    files.check_place(output, (journal_path(output),))


def check_free(output: str | Path) -> None:
    """UserError unless ``output`` can be written without clobbering a finished or interrupted run (and
    its folder can be written at all: checked before any work). A link counts as a file."""
    check_writable(output)
    check_unused(output)


def check_unused(output: str | Path) -> None:
    """UserError if ``output`` or its journal exists (a finished or an interrupted run's): the place itself
    checked already (``check_writable``). A link counts as a file."""
    output = Path(output)
    journal = journal_path(output)
    if os.path.lexists(output):
        raise UserError(f"{output} exists; use --overwrite to replace it")
    if os.path.lexists(journal):
        raise UserError(f"{journal} is an interrupted run's output; use --resume to continue it, or "
                        "--overwrite to start over")


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
            pyarrow_parquet()  # fail now, not after an hour of work
        check_writable(output)
        if not overwrite and not resume:
            check_free(output)
        if resume and not os.path.lexists(journal) and os.path.lexists(output):
            raise UserError(f"{output} is already complete; use --overwrite to classify again")
        if resume and os.path.lexists(journal):
            return cls.reopen(output, fmt, top_k, on_previous_row)
        return cls.create(output, fmt, top_k, replace=overwrite)

    @classmethod
    def create(cls, output: Path, fmt: str, top_k: int, replace: bool = False) -> JournalSink:
        """A new journal, its place checked already (``open``'s checks, or the caller's): ``replace`` removes
        one there (a link: itself), and lets ``finish`` replace a file at the output's name."""
        journal = journal_path(output)
        if fmt == "parquet":
            pyarrow_parquet()  # fail now, not after an hour of work
        try:
            if replace:
                remove_own(journal)
            fd = files.open_new(journal, os.O_RDWR)
        except FileExistsError:  # created meanwhile, by something else than a run (which holds the lock)
            raise UserError(f"{journal} appeared meanwhile; use --resume or --overwrite") from None
        except OSError as e:
            raise UserError(f"cannot write {journal}: {why(e)}") from None
        header = csv_header(top_k) if fmt == "csv" else b""
        try:
            os.write(fd, header)  # a few bytes: all or nothing
            files.fsync_dir(journal.parent)
        except OSError as e:
            os.close(fd)
            journal.unlink(missing_ok=True)  # nothing in it yet
            raise UserError(f"cannot write {journal}: {why(e)}") from None
        return cls(output, fmt, top_k, fd, len(header), replace=replace)

    @classmethod
    def reopen(cls, output: Path, fmt: str, top_k: int,
               on_previous_row: Callable[[dict], None] | None) -> JournalSink:
        """--resume: the journal after its last complete row (a torn tail is dropped). Every row is checked
        first (the scan's own checks, then ``on_previous_row``'s): until then nothing is changed."""
        journal = journal_path(output)
        try:
            fd = files.open_existing(journal, os.O_RDWR)  # a link is refused: never read or written through one
            try:
                good = _continue_at(fd, journal, fmt, top_k, on_previous_row)
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            raise UserError(f"cannot write {journal}: {why(e)}") from None
        return cls(output, fmt, top_k, fd, good)

    def _failed(self, e: OSError) -> OutputError:
        return OutputError(f"cannot write {self.journal}: {why(e)}. The rows written so far are kept there: "
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
                write_parquet(self.fd, self.output, self.top_k, self.replace)  # from the journal as opened
                os.unlink(self.journal)
            elif self.replace:
                os.replace(self.journal, self.output)
            else:
                self._link_output()
        except OSError as e:
            raise OutputError(f"cannot write {self.output}: {why(e)}. All its rows are in {self.journal}: "
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
                log.warning("cannot sync %s: %s", self.journal, why(e))
            finally:
                os.close(self.fd)
                self.fd = -1


def _continue_at(fd: int, journal: Path, fmt: str, top_k: int,
                 on_previous_row: Callable[[dict], None] | None) -> int:
    """Where new rows go in the journal open at ``fd``: after its last complete row, every row checked first
    (a torn tail is cut: new rows must start on a fresh line)."""
    good, cols = _scan(fd, journal, fmt, top_k, on_previous_row)
    os.ftruncate(fd, good)
    os.lseek(fd, good, os.SEEK_SET)
    if cols is None and fmt == "csv":
        good += os.write(fd, csv_header(top_k))
    return good


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

