"""--resume: continue only the run that wrote the journal, and only with rows that run writes. Under the
output's lock, before any work: the run record must be this run's (checked when the run's files are opened,
run_files.py), and every row read back one for a file this run's walk yields, once, with fields of the right type
and range (table.py checks the fields); else one line naming the line, and nothing is changed. A finished output
is checked the same way."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmnist_onnx.classify import sources
from fmnist_onnx.classify.contract import Batch, ClassifySummary, Request
from fmnist_onnx.classify.tally import Tally, summary_of_finished
from fmnist_onnx.errors import UserError
from fmnist_onnx.journal import RowRefused
from fmnist_onnx.table import path_digest, read_rows
from fmnist_onnx.text import visible

if TYPE_CHECKING:
    from fmnist_onnx.classify.run_files import Run

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


def continue_journal(request: Request, run: Run, tally: Tally) -> Done | None:
    """--resume of an interrupted run (``run.state`` JOURNAL, its record checked at open): the journal continued,
    each row read back one this run writes (a file its walk yields, once), counted in ``tally``; else one line
    naming the line, and nothing is changed (a torn last line is cut). The files it has rows for."""
    walked = Walked(sources.walk(request.roots, request.recursive, request.own_files, request.image_column))

    def previous(row: dict) -> None:
        walked.mark(row["path"])
        tally.add_row(row)
        tally.resumed += 1

    run.resume_journal(previous)
    return walked.done()


def finished_summary(request: Request) -> ClassifySummary:
    """--resume of a finished output (``run.state`` FINISHED, its record checked at open): its summary, if it has
    a row for every file the inputs hold, once; else one line."""
    output = Path(request.output)
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
