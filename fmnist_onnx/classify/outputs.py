"""What a run writes, in one place: the names of its files (the output, its journal, the run record, the lock,
the confusion PNG), the run record (``RunIdentity`` on disk: written before the journal exists, kept beside the
finished output, read back without following links and checked like any input; it names the confusion PNG and
the --report page as the run's own, for later runs), and the sink that takes the rows (stdout_sink.py, or a
journal, journal.py, that becomes the output only when complete)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fmnist_onnx.classify.contract import RECORD_MAX_BYTES, RECORD_VERSION, Request, RunIdentity
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import lock_path, open_existing, open_new, remove_own
from fmnist_onnx.journal import JournalSink, journal_path
from fmnist_onnx.stdout_sink import StdoutSink
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)


def identity_path(output: str | Path) -> Path:
    """The run record of an unfinished output (beside its journal)."""
    journal = journal_path(output)
    return journal.with_name(journal.name + ".run.json")


def record_path(output: str | Path) -> Path:
    """The run record of a finished output: the unfinished one's, renamed when the output got its name."""
    output = Path(output)
    return output.with_name(output.name + ".run.json")


def confusion_png_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".confusion.png")


def run_files(output: str, report: str | Path | None = None) -> tuple[str, ...]:
    """Every file a run on ``output`` writes: the output, its journal, run records and lock, the confusion PNG,
    the --report page and its lock (held from before the walk). None of them may be one of the run's inputs
    (request.py)."""
    named = [os.fspath(report), str(lock_path(report))] if report is not None else []
    if output == "-":
        return tuple(named)
    return (output, str(journal_path(output)), str(identity_path(output)), str(record_path(output)),
            str(lock_path(output)), str(confusion_png_path(output)), *named)


def check_same_run(record: Path, identity: RunIdentity, what: Path) -> None:
    """--resume: UserError unless ``what`` (a journal, or a finished output) was written by this same run, as
    its ``record`` says. The record is read without following links."""
    try:
        fd = open_existing(record)
    except FileNotFoundError:
        raise UserError(f"{what}: no record of the run that wrote it ({record.name} is missing); "
                        "use --overwrite to start over") from None
    except OSError as e:
        raise UserError(f"{record}: unreadable ({e.strerror}); use --overwrite to start over") from None
    try:
        old = _read_record(fd)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{record}: unreadable ({visible(e)}); use --overwrite to start over") from None
    if old.version != RECORD_VERSION:  # its rows may name repeated members, or '::' in a file's name, otherwise
        raise UserError(f"--resume: {what} was written by {'an earlier' if old.version < RECORD_VERSION else 'a later'}"
                        f" version of fmnist-onnx (run record version {old.version}, this one's is {RECORD_VERSION}), "
                        "which names rows otherwise; use --overwrite to classify again")
    diffs = identity.differences(old)
    if diffs:
        raise UserError(f"--resume: {what} was written by another run: {'; '.join(diffs)}. "
                        "Resume with the same model, options and inputs, or use --overwrite to start over")


def _read_record(fd: int) -> RunIdentity:
    """The run record open at ``fd`` (closed here), bounded; ValueError naming what is wrong with it."""
    with os.fdopen(fd, "rb") as f:
        data = f.read(RECORD_MAX_BYTES + 1)
    if len(data) > RECORD_MAX_BYTES:
        raise ValueError(f"more than {RECORD_MAX_BYTES:,} bytes")
    return RunIdentity.from_json(data.decode("utf-8"))


def recorded_writes(output: str) -> frozenset[str]:
    """What the run records beside ``output`` (an earlier run's, finished or not) name as that run's own files
    (``RunIdentity.writes``: the confusion PNG, the --report page), as absolute paths. A record that is
    missing, a link, or not one a run wrote names nothing: its files are then the user's."""
    if output == "-":
        return frozenset()
    named: set[str] = set()
    for record in (record_path(output), identity_path(output)):
        try:
            named.update(_read_record(open_existing(record)).writes)
        except (UserError, OSError, ValueError):
            continue
    return frozenset(named)


def write_identity(output: str, identity: RunIdentity) -> None:
    """The run record of a new journal: created exclusively, never through a link (one there is removed)."""
    path = identity_path(output)
    try:
        remove_own(path)
        fd = open_new(path)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.to_json().encode())
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        raise UserError(f"{path} appeared meanwhile; run again") from None
    except OSError as e:  # before any row: nothing is lost, and nothing to resume
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def open_sink(request: Request) -> JournalSink | StdoutSink:
    """A new sink for the output: stdout, or a new journal with the run's record beside it (written first).
    (--resume continues a journal in ``resume_state``.)"""
    if request.output == "-":
        return StdoutSink(request.top_k)
    write_identity(request.output, request.identity)
    return JournalSink.open(request.output, request.fmt, request.top_k, request.resume, request.overwrite)


def finish_sink(sink: JournalSink | StdoutSink, output: str) -> str | Path:
    """The complete output; its journal is gone and its run record, renamed, stays beside it (``record_path``:
    a later --resume checks it)."""
    final = sink.finish()
    if output != "-":
        try:
            os.replace(identity_path(output), record_path(output))  # a link at the name is replaced, not followed
        except FileNotFoundError:
            pass
        except OSError as e:  # the output is complete: only a later --resume would miss the record
            log.warning("cannot keep the run record %s: %s", record_path(output), e.strerror)
    return final
