"""A run's files, and the one object that owns them from open to commit or keep.

A classify run with ``-o OUT`` (and ``--report PAGE``) writes these files and no others (``RunFiles``, the only
list: request.py keeps them out of the walk and refuses any that is an input; report.py refuses a page at any):

    OUT.lock, PAGE.lock    the locks: one run per output and per page at a time (files.OutputLock)
    OUT.partial            the journal: rows appended as they come (journal.py)
    OUT.partial.run.json   its run record (contract.RunIdentity): written before the journal, checked by --resume
    OUT                    the output: the journal renamed (or converted, for Parquet) once complete
    OUT.run.json           the run record, renamed beside the output: a later --resume checks it
    STEM.confusion.png     the confusion matrix (STEM: OUT's name less its suffix), where rows have true classes
    PAGE                   the --report page (written by the caller's ``on_summary``: report.py is above this)

With ``-o -`` the rows go to stdout (stdout_sink.py) and only the page and its lock are files. The run's life is
``with Run(request, report, on_summary) as run``:

1. open: the page's lock, then the output's (held to the end); then the state of the output, once: a new run
   finds none of its files (unless --overwrite); --resume continues a journal, or re-checks a finished output,
   only where the run record beside it is this run's;
2. rows: ``resume_journal`` (the rows read back) or ``start`` (the record, then a new journal), then ``write``;
3. commit, in this order and under both locks: the journal becomes the output, its record goes beside it, the
   confusion PNG (or an earlier run's removed, where the run may replace it), then ``on_summary`` (the page);
4. keep, on any failure before the commit (``__exit__``):
   - Ctrl-C, SIGTERM: the journal and its record stay, named (errors.Interrupted: "--resume to finish");
   - a write that fails (files.OutputError, exit 4), a model that fails mid-run: both stay, named;
   - a user error before the first row of a new run (the model fails on the first chunk): the journal and its
     record are removed, as nothing is there to resume; any other error: both stay, not named;
   - the lock removed under the run (files.LockLost): everything is left as it is, and nothing is named;
   - killed (SIGKILL): the journal, its record and the lock file stay (a later run takes the lock over).
   A failure after the output got its name (the PNG: a warning; the page) leaves the output complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist_onnx.classify.contract import RECORD_MAX_BYTES, RECORD_VERSION, ClassifySummary, Request, Rows, RunIdentity
from fmnist_onnx.errors import Interrupted, UserError
from fmnist_onnx.files import (
    LOCK_SUFFIX,
    LockLost,
    OutputError,
    OutputLock,
    check_locks,
    open_existing,
    open_new,
    remove_own,
)
from fmnist_onnx.journal import JOURNAL_SUFFIX, JournalSink, check_unused
from fmnist_onnx.runtime import ModelRunError
from fmnist_onnx.signals import StopSignals, signum_of
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.stdout_sink import StdoutSink
from fmnist_onnx.text import visible

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFiles:
    """The names of every file a run on ``output`` ('-': stdout, no file of its own) writes, derived once from
    the output's and the page's names (``of``): the module's list."""

    output: str
    report: str | None
    journal: Path  # with -o -: never used, as the other names of the output's files
    journal_record: Path  # the run record of an unfinished output, beside its journal
    record: Path  # the run record of a finished output: the journal's, renamed when the output got its name
    lock: Path
    confusion_png: Path
    report_lock: Path | None

    @classmethod
    def of(cls, output: str | Path, report: str | Path | None = None) -> RunFiles:
        out = Path(output)
        journal = out.with_name(out.name + JOURNAL_SUFFIX)  # the names journal.py and files.py give them
        return cls(os.fspath(output), os.fspath(report) if report is not None else None, journal,
                   journal.with_name(journal.name + ".run.json"), out.with_name(out.name + ".run.json"),
                   out.with_name(out.name + LOCK_SUFFIX), out.with_name(out.stem + ".confusion.png"),
                   Path(f"{os.fspath(report)}{LOCK_SUFFIX}") if report is not None else None)

    def all(self) -> tuple[str, ...]:
        """Every file the run writes, locks included. None of them may be one of the run's inputs."""
        named = [self.report, str(self.report_lock)] if self.report is not None else []
        if self.output == "-":
            return tuple(named)
        return (self.output, str(self.journal), str(self.journal_record), str(self.record), str(self.lock),
                str(self.confusion_png), *named)

    def finished_record(self) -> Path:
        """The record of the finished output: beside it, or still the journal's where the run ended between the
        output's rename and the record's (``Run.commit``'s order)."""
        if not os.path.lexists(self.record) and os.path.lexists(self.journal_record):
            return self.journal_record
        return self.record


def identity_path(output: str | Path) -> Path:
    return RunFiles.of(output).journal_record


def record_path(output: str | Path) -> Path:
    return RunFiles.of(output).record


def confusion_png_path(output: str | Path) -> Path:
    return RunFiles.of(output).confusion_png


NEW, JOURNAL, FINISHED = "new", "journal", "finished"  # what open finds (``Run.state``)


class Run:
    """One run's files, opened once and closed once: see the module's docstring. ``on_summary(summary)`` is
    called last, under the locks (the CLI shows the summary and writes the --report page there)."""

    def __init__(self, request: Request, report: str | Path | None = None,
                 on_summary: Callable[[ClassifySummary], object] | None = None) -> None:
        self.request, self.on_summary = request, on_summary
        self.files = RunFiles.of(request.output, report)
        self.sink: JournalSink | StdoutSink | None = None
        self.state = NEW
        self.rows = 0  # rows written or read back: a new journal without any is removed on failure
        self.committed = False
        self._locks = ExitStack()

    def __enter__(self) -> Run:
        files = self.files
        try:
            for name in (files.report, None if files.output == "-" else files.output):
                if name is not None:
                    self._locks.enter_context(OutputLock(name))
            self.state = self._check_state()
        except BaseException:
            self._locks.close()
            raise
        return self

    def _check_state(self) -> str:
        """What the output's files say, under its lock and before any work: nothing to clobber (a new run), or
        the journal or the finished output --resume continues, written by this same run (its record)."""
        r, f = self.request, self.files
        if r.output == "-" or r.overwrite:
            return NEW
        if not r.resume:
            check_unused(r.output)
            if os.path.lexists(f.confusion_png):
                raise UserError(f"{f.confusion_png} exists (this run would write its confusion matrix there); use "
                                "--overwrite to replace it")
            return NEW
        if os.path.lexists(f.journal):
            try:
                os.close(open_existing(f.journal))  # a link there: refused first, whatever else is wrong
            except OSError as e:
                raise UserError(f"cannot open {f.journal}: {e.strerror}") from None
            check_same_run(f.journal_record, r.identity, f.journal)
            return JOURNAL
        if os.path.lexists(f.output):
            check_same_run(f.finished_record(), r.identity, Path(f.output))
            return FINISHED
        return NEW

    def resume_journal(self, on_previous_row: Callable[[dict], None]) -> None:
        """--resume (state JOURNAL): the journal after its last complete row, each row read back given to
        ``on_previous_row`` first (it raises journal.RowRefused for one this run does not write)."""
        def previous(row: dict) -> None:
            on_previous_row(row)
            self.rows += 1

        r = self.request
        self.sink = JournalSink.reopen(Path(r.output), r.fmt, r.top_k, previous)

    def start(self) -> None:
        """The sink, unless the journal was resumed: stdout, or the run record then a new journal."""
        r = self.request
        if self.sink is not None:
            return
        if r.output == "-":
            self.sink = StdoutSink(r.top_k)
            return
        _write_record(self.files.journal_record, r.identity)
        self.sink = JournalSink.create(Path(r.output), r.fmt, r.top_k, replace=r.overwrite)

    @property
    def encoding(self) -> str:
        return self.sink.encoding

    def write(self, rows: Rows) -> None:
        self.sink.write_encoded(rows.data)
        self.rows += len(rows)

    def commit(self, confusion: np.ndarray | None, accuracy: float | None,
               summary: Callable[[str | Path, float, str | None], ClassifySummary]) -> ClassifySummary:
        """The journal becomes the output, its record goes beside it, the confusion PNG (``confusion``: None
        where not every row has a true class), then ``on_summary``. ``summary(final, done, png)`` makes the
        summary (``done``: time.perf_counter() once the output was complete; ``png``: the PNG written, or None)."""
        output, files = self.request.output, self.files
        with StopSignals(raises=True):
            check_locks()  # a run whose lock was removed may share its output with another: nothing is renamed
            final = self.sink.finish()
            done = time.perf_counter()
            try:
                if output != "-":
                    os.replace(files.journal_record, files.record)  # a link there is replaced, not followed
            except FileNotFoundError:
                pass
            except OSError as e:  # the output is complete: only a later --resume would miss the record
                log.warning("cannot keep the run record %s: %s", files.record, e.strerror)
        self.committed = True
        png = None if output == "-" else _confusion_png(files.confusion_png, output, confusion, accuracy,
                                                         replace=self.request.overwrite or self.request.resume)
        return self.publish(summary(final, done, str(png) if png else None))

    def publish(self, s: ClassifySummary) -> ClassifySummary:
        """The summary to ``on_summary``, the run's last step (a --resume of a finished output: its only one)."""
        if self.on_summary is not None:
            self.on_summary(s)
        return s

    def __exit__(self, exc_type, e, tb) -> None:
        try:
            if e is not None and not self.committed:
                self._keep(e)
        except BaseException as raised:
            self._locks.__exit__(type(raised), raised, raised.__traceback__)
            raise
        self._locks.__exit__(exc_type, e, tb)

    def _keep(self, e: BaseException) -> None:
        """After a failure: the journal closed and kept for --resume, and named (see the module's docstring)."""
        sink = self.sink
        try:
            check_locks()
        except LockLost:  # another run may be writing the journal: neither removed nor named
            if sink is not None:
                sink.close()
            raise
        if sink is not None:
            sink.close()
        signum = signum_of(e)
        journal = getattr(sink, "journal", None)
        if signum is not None:
            raise Interrupted(signum, journal, f"rows so far are in {journal}; run the same command with --resume "
                              "to finish.") from None
        if not isinstance(e, UserError) or isinstance(e, OutputError) or not isinstance(sink, JournalSink):
            return
        if not self.rows and not self.request.resume:  # nothing to resume: the engine could not start, ...
            with contextlib.suppress(UserError):  # best effort: the error on its way out is the one to tell
                remove_own(self.files.journal)
                remove_own(self.files.journal_record)
        elif isinstance(e, ModelRunError):
            raise ModelRunError(f"{e}. The {self.rows:,} rows so far are kept in {journal}: free some memory (or "
                                "give a smaller --batch-size) and run the same command with --resume") from None


def _confusion_png(path: Path, output: str, confusion: np.ndarray | None, accuracy: float | None,
                   replace: bool) -> Path | None:
    """The confusion matrix at ``path``, beside the output, written atomically (a link at its name is replaced,
    never followed), replacing a file there only where the run may (``replace``: --overwrite, or the --resume of
    one); ``confusion`` None: no picture, and an earlier run's removed where the run may replace it."""
    from fmnist_onnx.plots import confusion_matrix  # Pillow only: works on the inference-only install too

    try:
        if confusion is None:
            if replace:
                remove_own(path)  # an earlier run's would describe other rows
            return None
        confusion_matrix(confusion, CLASSES, path, title=f"{Path(output).name}: accuracy {accuracy:.2f}%",
                         overwrite=replace)
    except (OSError, UserError) as e:  # a full disk, a file put there meanwhile: the table is written, the
        log.warning("cannot write %s: %s", path, getattr(e, "strerror", None) or e)  # picture is extra
        return None
    return path


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


def recorded_writes(files: RunFiles) -> frozenset[str]:
    """What the run records of ``files.output`` (an earlier run's, finished or not) name as that run's own files
    (``RunIdentity.writes``: the confusion PNG, the --report page), as absolute paths. A record that is
    missing, a link, or not one a run wrote names nothing: its files are then the user's."""
    if files.output == "-":
        return frozenset()
    named: set[str] = set()
    for record in (files.record, files.journal_record):
        try:
            named.update(_read_record(open_existing(record)).writes)
        except (UserError, OSError, ValueError):
            continue
    return frozenset(named)


def _write_record(path: Path, identity: RunIdentity) -> None:
    """The run record of a new journal: created exclusively, never through a link (one there is removed)."""
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
