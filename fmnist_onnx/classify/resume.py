"""--resume: continue only the run that wrote the journal, and only with rows that run writes. Under the
output's lock, before any work: the run record must be this run's, and every row read back one for a file this
run's walk yields, once, with fields of the right type and range (table.py checks the fields); else one line
naming the line, and nothing is changed. A finished output is checked the same way."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fmnist_onnx.classify import sources
from fmnist_onnx.classify.contract import Batch, ClassifySummary, Request
from fmnist_onnx.classify.outputs import check_same_run, identity_path, record_path
from fmnist_onnx.classify.tally import Tally, summary_of_finished
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import open_existing
from fmnist_onnx.journal import JournalSink, RowRefused, journal_path
from fmnist_onnx.table import path_digest, read_rows
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)


def path_key(path: str) -> int:
    # 64-bit digests: 8 bytes a row to remember what an interrupted run did (collision odds ~1e-8 at 1e6 files)
    return int.from_bytes(path_digest(path), "little")


class Done:
    """Paths an interrupted run already wrote, as sorted 64-bit digests (memory: 8 bytes a file)."""

    def __init__(self, keys: list[int]) -> None:
        self.keys = np.unique(np.array(keys, dtype=np.uint64))

    def __contains__(self, path: str) -> bool:
        key = np.uint64(path_key(path))
        i = int(np.searchsorted(self.keys, key))
        return i < len(self.keys) and self.keys[i] == key


class Walked:
    """The files this run's walk yields, as sorted 64-bit digests (8 bytes a file), and which of them rows
    read back name: --resume continues only rows for these files, each once."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        keys: list[int] = []
        for batch in batches:
            if batch.unlistable is not None:  # a folder that cannot be listed has a row of its own
                keys.append(path_key(batch.unlistable.path))
            keys += map(path_key, batch.files)
        self.keys = np.unique(np.array(keys, dtype=np.uint64))
        self.seen = np.zeros(len(self.keys), dtype=bool)

    def mark(self, path: str) -> None:
        """RowRefused unless ``path`` is a walked file that no row named before."""
        key = np.uint64(path_key(path))
        i = int(np.searchsorted(self.keys, key))
        if i == len(self.keys) or self.keys[i] != key:
            raise RowRefused(f"names {visible(path)}, which is not among this run's input files")
        if self.seen[i]:
            raise RowRefused(f"names {visible(path)} again (an earlier line has it)")
        self.seen[i] = True

    def done(self) -> Done | None:
        return Done(self.keys[self.seen]) if self.seen.any() else None

    def missing(self) -> int:
        return int(len(self.seen) - self.seen.sum())


def resume_state(request: Request, tally: Tally) -> tuple[ClassifySummary | None, JournalSink | None,
                                                                        Done | None]:
    """--resume, under the output's lock and before any work: (the summary of a finished output, or None;
    the journal continued, or None for a new one; the files it has rows for). The journal's run record must be
    this run's, and every row one this run writes: a file its walk yields, once, with fields of the right type
    and range; else one line naming the line, and nothing is changed (a torn last line is cut)."""
    output, journal = request.output, journal_path(request.output)
    if os.path.lexists(journal):
        try:
            os.close(open_existing(journal))  # a link there: refused first, whatever else is wrong
        except OSError as e:
            raise UserError(f"cannot open {journal}: {e.strerror}") from None
        check_same_run(identity_path(output), request.identity, journal)
        walked = Walked(sources.walk(request.roots, request.recursive, request.own_files, request.image_column))

        def previous(row: dict) -> None:
            walked.mark(row["path"])
            tally.add_row(row)
            tally.resumed += 1

        sink = JournalSink.open(output, request.fmt, request.top_k, resume=True, on_previous_row=previous)
        return None, sink, walked.done()
    if os.path.lexists(output):
        return _finished(request), None, None
    return None, None, None  # nothing to resume: a new run


def _finished(request: Request) -> ClassifySummary:
    """--resume on a finished output: its summary, if this same run wrote it and it has a row for every file
    the inputs hold, once; else one line."""
    output = Path(request.output)
    record = record_path(output)
    if not os.path.lexists(record) and os.path.lexists(identity_path(output)):
        record = identity_path(output)  # the run ended between the output's rename and the record's
    check_same_run(record, request.identity, output)
    walked = Walked(sources.walk(request.roots, request.recursive, request.own_files, request.image_column))
    tally = Tally()
    for n, row in enumerate(read_rows(output), 1):
        try:
            walked.mark(row["path"])
        except RowRefused as e:
            raise UserError(f"--resume: {output}: row {n} {e}; use --overwrite to classify again") from None
        tally.add_row(row)
    if walked.missing():
        raise UserError(f"--resume: {output} is complete, but {walked.missing():,} files of the inputs have no "
                        "row in it (added since it was written); use --overwrite to classify again")
    log.info("%s is complete already", output)
    return summary_of_finished(output, request.fmt, tally)
