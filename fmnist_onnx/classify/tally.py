"""Counting a run: files classified and failed, the confusion matrix in the ImageFolder layout, accuracy and
per-class precision and recall, the summary and its text (``format_summary``). Counting only: the run's files,
the confusion-matrix PNG among them, are run_files.py's."""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path

import numpy as np

from fmnist_onnx.classify.contract import ClassifySummary, ClassMetrics, Rows
from fmnist_onnx.classify.predict import row_truth
from fmnist_onnx.spec import CLASSES, NUM_CLASSES
from fmnist_onnx.text import visible


class Tally:
    """Counts, and a confusion matrix for files in the ImageFolder layout."""

    def __init__(self) -> None:
        self.classified = self.failed = self.skipped = self.resumed = 0
        self.unlabelled = 0
        self.skipped_kinds: Counter[str] = Counter()  # archive members that are no file (Batch.kinds)
        self.confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)  # [true, predicted]
        self.failures: list[dict] = []
        self.beside: tuple[int, list[str]] = (0, [])  # containers skipped in folders of images (sources.Seen)

    def add_rows(self, rows: Rows) -> None:
        """A chunk, with array operations: the cost per file stays well under a microsecond."""
        ok = rows.indices >= 0
        n_ok = int(ok.sum())
        self.classified += n_ok
        self.failed += len(rows) - n_ok
        if n_ok < len(rows) and len(self.failures) < 10:
            for i in np.flatnonzero(~ok)[:10 - len(self.failures)].tolist():
                self.failures.append({"path": rows.paths[i], "error": rows.errors[i]})
        truth, pred = rows.truth[ok], rows.indices[ok]
        labelled = truth >= 0
        self.unlabelled += int(len(truth) - labelled.sum())
        np.add.at(self.confusion, (truth[labelled], pred[labelled]), 1)

    def add_row(self, row: dict) -> None:
        """One row of a finished output or a journal (a dict, as table.read_rows gives it)."""
        if row.get("error"):
            self.failed += 1
            if len(self.failures) < 10:
                self.failures.append({"path": row["path"], "error": row["error"]})
            return
        self.classified += 1
        truth = row_truth(row)
        if truth < 0:
            self.unlabelled += 1
        else:
            self.confusion[truth, row["index"]] += 1

    def metrics(self) -> tuple[float | None, list[ClassMetrics] | None]:
        """Accuracy and per-class precision/recall, when every classified file has a class folder."""
        labelled = int(self.confusion.sum())
        if not labelled or self.unlabelled:
            return None, None
        cm = self.confusion
        diag = np.diag(cm)
        per_class = []
        for i, name in enumerate(CLASSES):
            predicted, actual = int(cm[:, i].sum()), int(cm[i].sum())
            per_class.append(ClassMetrics(name, round(diag[i] / predicted, 4) if predicted else None,
                                          round(diag[i] / actual, 4) if actual else None, actual))
        return round(100.0 * diag.sum() / labelled, 2), per_class


def summarize(tally: Tally, final: str | Path, fmt: str, provider: str, workers: int, decoder: str, seconds: float,
              confusion_png: str | None = None, provider_reason: str | None = None) -> ClassifySummary:
    """The summary of a finished run (any engine); ``confusion_png``: the picture the run wrote, if any
    (run_files.Run.commit writes it)."""
    acc, per_class = tally.metrics()
    new = tally.classified + tally.failed - tally.resumed
    return ClassifySummary(
        output=str(final), format=fmt, provider=provider, workers=workers, decoder=decoder,
        files=tally.classified + tally.failed, classified=tally.classified, failed=tally.failed,
        skipped=tally.skipped, resumed=tally.resumed, seconds=round(seconds, 3),
        images_per_s=round(new / seconds, 1) if seconds > 0 else 0.0, accuracy_pct=acc, per_class=per_class,
        confusion_png=confusion_png, failures=tally.failures, provider_reason=provider_reason,
        skipped_kinds=dict(sorted(tally.skipped_kinds.items())),
        containers_skipped=tally.beside[0], containers_skipped_first=tally.beside[1],
    )


_KIND_WORDS = {"symlink": ("symlink to nothing in its archive", "symlinks to nothing in their archive"),
               "device": ("device", "devices"), "FIFO": ("FIFO", "FIFOs"),
               "other": ("archive member of another kind", "archive members of another kind")}


def _kinds(kinds: dict[str, int]) -> str:
    """' (of them 2 symlinks to nothing in their archive, 1 device)': the skipped members that are no file."""
    words = [f"{n} {_KIND_WORDS.get(k, (k, k))[n != 1]}" for k, n in kinds.items()]
    return f" (of them {', '.join(words)})" if words else ""


def format_summary(s: ClassifySummary) -> str:
    """The summary as a person reads it. Names and errors come from outside: shown with control and
    bidirectional characters as visible escapes (text.visible), never raw on a terminal."""
    lines = []
    output = visible(s.output)
    if s.already_complete:
        lines.append(f"{output} is complete already: {s.files} rows.")
    else:
        skipped = f", {s.skipped} other files skipped{_kinds(s.skipped_kinds)}" if s.skipped else ""
        resumed = f", {s.resumed} of them from the interrupted run" if s.resumed else ""
        lines.append(f"{s.classified} of {s.files} files classified, {s.failed} failed{skipped}{resumed}.")
        if s.containers_skipped:
            lines.append(_containers_line(s))
        lines.append(f"{s.seconds:.2f} s, {s.images_per_s:,.0f} images/s ({s.provider}, {s.workers} decoding "
                     f"processes, {s.decoder}); wrote {output}")
    if s.accuracy_pct is not None:
        lines.append(f"accuracy {s.accuracy_pct:.2f}% (true classes from the inputs: class folders, .cls sidecars "
                     "or a label column)")
        lines.append(f"  {'class':<12} {'precision':>9} {'recall':>7} {'files':>7}")
        for m in s.per_class or []:
            p = f"{m.precision:.3f}" if m.precision is not None else "-"
            r = f"{m.recall:.3f}" if m.recall is not None else "-"
            lines.append(f"  {m.label:<12} {p:>9} {r:>7} {m.support:>7}")
    if s.confusion_png:
        lines.append(f"confusion matrix: {visible(s.confusion_png)}")
    if s.failed:
        lines.append(f"failed files ({'first ' + str(len(s.failures)) if s.failed > len(s.failures) else 'all'}):")
        lines += [f"  {visible(f['path'])}: {visible(f['error'])}" for f in s.failures]
    return "\n".join(lines)


def _containers_line(s: ClassifySummary) -> str:
    """The archives and Parquet files a folder of images holds: skipped, and the command that reads them."""
    names = " ".join(shlex.quote(visible(p)) for p in s.containers_skipped_first)
    more = " ..." if s.containers_skipped > len(s.containers_skipped_first) else ""
    return (f"{s.containers_skipped} of the skipped files are archives or Parquet files in folders of images, not "
            f"read (a folder is read as shards only where it holds no image); to read them, name them: "
            f"fmnist-onnx classify {names}{more}")


def summary_of_finished(output: Path, fmt: str, tally: Tally) -> ClassifySummary:
    acc, per_class = tally.metrics()
    return ClassifySummary(str(output), fmt, "", 0, "", tally.classified + tally.failed, tally.classified,
                           tally.failed, 0, tally.classified + tally.failed, 0.0, 0.0, acc, per_class, None,
                           tally.failures, already_complete=True)
