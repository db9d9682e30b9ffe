"""classify: folders of images -> a table of predictions, one row per file, with onnxruntime.

The pipeline, the same for every engine:

1. the request and its checks (``check_request``): inputs, model, options, output, each a one-line
   UserError before any work; then, holding the output's lock (one run per output at a time), its state:
   nothing to clobber (``check_fresh``), or on --resume that the journal, or the finished output, was
   written by this same run (``RunIdentity``) and holds only rows this run writes (``resume_state``);
2. the walk (``images.iter_batches``, or the engine's own for URIs): streamed, sorted, cut into chunks of
   paths (``work_items``); files an interrupted run wrote already are skipped, and the run's own files
   (``run_files``) are left out wherever they lie: a run never reads its outputs back;
3. the engine: chunks of paths -> ``Rows`` (encoded as the sink writes them, with their top-1 classes and
   true classes as arrays): ``engines/local.py`` (worker processes here, the default) or ``engines/ray.py``
   (Ray Data on a cluster), behind one small interface (``Engine``);
4. the sink (sinks.py): rows appended to a journal that becomes the output only when complete;
5. the summary: counts, accuracy and the confusion matrix in the ImageFolder layout.

The process that walks and writes handles arrays and bytes per chunk, not a Python object per file: that
is what keeps it off the critical path on many cores. No torch here.

Chunks adapt to the images: small at first (first rows come at once), then about a quarter second of work
each, at most the engine's ``max_chunk`` files (2048; 8192 where a batched stage runs the model: on the H100,
CUDA's path ran 1.18x faster with them, the CPU's 0.88x): big photos are journaled often, tiny PNGs go in big
chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import OutputLock, lock_path, open_existing, open_new, same_file
from fmnist_onnx.runtime import ModelRunError
from fmnist_onnx.sinks import (
    JournalSink,
    OutputError,
    Row,
    RowRefused,
    StdoutSink,
    encode,
    encode_csv_top1,
    format_for,
    journal_path,
    read_rows,
    remove_own,
)
from fmnist_onnx.spec import CLASSES, NUM_CLASSES
from fmnist_onnx.testing import pause_point
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)

FIRST_CHUNK = 64
MAX_CHUNK = 2048  # files a chunk holds at most where the decoding processes run the model
BATCHED_MAX_CHUNK = 8192  # ... where a batched stage does (fewer, bigger round trips through the parent)
CHUNK_SECONDS = 0.25
DEFAULT_BATCH = 512  # images per onnxruntime call where the model runs beside the decoder (the CPU)
CRASHED = "the decoder crashed on this file (its process died)"
NON_FINITE = "the model gave non-finite logits (NaN or infinity) for this image"
ENGINES = ("local", "ray")
RECORD_MAX_BYTES = 256 << 20  # a run record names the inputs: a shell glob of 100,000 files is ~10 MB


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the journal keeps every row written so far; --resume continues."""

    def __init__(self, signum: int, journal: Path | None) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.journal = signum, journal


@dataclass
class ClassMetrics:
    label: str
    precision: float | None  # None: no file was predicted as this class
    recall: float | None  # None: no file of this class
    support: int


@dataclass
class ClassifySummary:
    output: str
    format: str
    provider: str
    workers: int
    decoder: str
    files: int  # rows in the output: classified + failed
    classified: int
    failed: int
    skipped: int  # files in the folders that are not images (no row)
    resumed: int  # rows written by an earlier, interrupted run
    seconds: float
    images_per_s: float  # files of this run per second, wall clock, walking and writing included
    accuracy_pct: float | None = None  # ImageFolder layout only
    per_class: list[ClassMetrics] | None = None
    confusion_png: str | None = None
    failures: list[dict] = field(default_factory=list)  # the first few {path, error}
    already_complete: bool = False


# ---------------------------------------------------------------------------------------------- rows

@dataclass
class Rows:
    """A chunk of rows as an engine gives them back: encoded for the sink, plus what the summary counts, as
    arrays (the parent never makes a Python object per file)."""

    data: bytes  # the rows, as the sink's text format (CSV without header, or JSONL)
    indices: np.ndarray  # int16 [n]: top-1 class, -1 for a failed file
    truth: np.ndarray  # int16 [n]: class from the folder names (ImageFolder layout), -1 where none
    errors: list[str]  # "" where the file was classified
    seconds: float = 0.0  # decoding time of the chunk (chunk sizing)
    paths: Sequence[str] | None = None  # set by the engine in the parent (not sent back by workers)

    def __len__(self) -> int:
        return len(self.indices)


_truth_cache: dict[str, int] = {}


def true_classes(paths: Sequence[str]) -> np.ndarray:
    """images.true_class of each path as int16 (-1: none), looked up once per folder."""
    if os.altsep is None:  # POSIX: one separator
        folders = [p.rpartition(os.sep)[0] for p in paths]
    else:
        folders = [p[:max(p.rfind(os.altsep), p.rfind(os.sep))] for p in paths]
    for folder, path in zip(folders, paths, strict=True):  # new folders only: a dict lookup per path below
        if folder not in _truth_cache:
            c = images.true_class(path)
            _truth_cache[folder] = -1 if c is None else c
    return np.array([_truth_cache[f] for f in folders], np.int16)


def make_rows(session, paths: Sequence[str], imgs: np.ndarray | None, errors: Sequence[str], top_k: int,
              batch_size: int, encoding: str, io_binding: bool = False) -> Rows:
    """The model on a decoded chunk -> its Rows (``session`` may be None when every file failed). The common
    case (CSV, top-1) is encoded straight from the arrays, without a Row object per file."""
    errors, ok, order, scores = _top_k(session, paths, imgs, errors, top_k, batch_size, io_binding)
    data = None
    if encoding == "csv" and top_k == 1 and len(ok) == len(paths):
        data = encode_csv_top1(paths, order[:, 0].tolist(), scores[:, 0].tolist())
    if data is None:  # JSONL, top-k, error rows, or paths that need quoting or escaping: row by row
        return rows_of(_as_rows(paths, errors, ok, order, scores), encoding, top_k)
    return Rows(data, order[:, 0].astype(np.int16), true_classes(paths), errors, paths=paths)


def rows_of(rows: Sequence[Row], encoding: str, top_k: int) -> Rows:
    """Rows made elsewhere (an engine's own, or an unlistable folder's) as a Rows chunk."""
    indices = np.array([r.indices[0] if not r.error else -1 for r in rows], np.int16)
    paths = [r.path for r in rows]
    return Rows(encode(rows, encoding, top_k), indices, true_classes(paths), [r.error for r in rows], paths=paths)


def _top_k(session, paths: Sequence[str], imgs: np.ndarray | None, errors: Sequence[str], top_k: int,
           batch_size: int, io_binding: bool) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(errors, ok, order, scores): the top-k classes by logit (ties: lowest index, as argmax) of the files
    ``ok`` (indices), with softmax scores. Logits that are not finite (a broken model) make an error, never a
    class."""
    errors = list(errors)
    ok = np.flatnonzero(np.array([not e for e in errors], dtype=bool))
    if not len(ok):
        return errors, ok, np.zeros((0, top_k), np.int64), np.zeros((0, top_k))
    x = images.to_model_input(imgs[ok])
    logits = np.concatenate([session.run(x[i:i + batch_size], io_binding=io_binding)
                             for i in range(0, len(x), batch_size)])
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():
        for i in ok[~finite].tolist():
            errors[i] = NON_FINITE
        ok, logits = ok[finite], logits[finite]
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    return errors, ok, order, np.take_along_axis(probs, order, axis=1)


def _as_rows(paths: Sequence[str], errors: list[str], ok: np.ndarray, order: np.ndarray,
             scores: np.ndarray) -> list[Row]:
    rows = [Row(p, error=e) if e else None for p, e in zip(paths, errors, strict=True)]
    for i, idx, sc in zip(ok.tolist(), order.tolist(), scores.tolist(), strict=True):
        rows[i] = Row(paths[i], idx, sc)
    return rows


def predict_rows(session, paths: Sequence[str], imgs: np.ndarray | None, errors: Sequence[str], top_k: int,
                 batch_size: int, io_binding: bool = False) -> list[Row]:
    """Rows for a decoded chunk: top-k classes by logit (ties: lowest index, as argmax) with softmax scores,
    or an error row (a file that failed, logits that are not finite)."""
    return _as_rows(paths, *_top_k(session, paths, imgs, errors, top_k, batch_size, io_binding))


# ---------------------------------------------------------------------------------------------- counting

class Tally:
    """Counts, and a confusion matrix for files in the ImageFolder layout."""

    def __init__(self) -> None:
        self.classified = self.failed = self.skipped = self.resumed = 0
        self.unlabelled = 0
        self.confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)  # [true, predicted]
        self.failures: list[dict] = []

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
        """One row of a finished output or a journal (a dict, as sinks.read_rows gives it)."""
        if row.get("error"):
            self.failed += 1
            if len(self.failures) < 10:
                self.failures.append({"path": row["path"], "error": row["error"]})
            return
        self.classified += 1
        truth = int(true_classes([row["path"]])[0])
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


# ---------------------------------------------------------------------------------------------- the request

@dataclass(frozen=True)
class Request:
    """A checked classify request: what every engine is given."""

    roots: list[str]
    model: str
    output: str
    fmt: str
    top_k: int
    batch_size: int | None  # None: the engine's choice (DEFAULT_BATCH beside the decoder, whole chunks on a GPU)
    invert: str
    recursive: bool
    resume: bool
    overwrite: bool
    provider: str  # as asked: auto, or a name in runtime.PROVIDER_TABLE
    identity: RunIdentity | None  # None for stdout, which cannot be resumed
    own_files: tuple[str, ...] = ()  # what the run writes (run_files): the walk leaves them out


@dataclass(frozen=True)
class RunIdentity:
    """What decides an output's rows: ``--resume`` continues only the run that wrote the journal.

    Kept beside the journal as ``<output>.partial.run.json``, written before the journal exists, and beside
    the finished output as ``<output>.run.json`` (so that --resume on a finished output is checked too).
    Options that do not change a row (workers, batch size, provider, engine) are not part of it."""

    model_sha256: str
    invert: str
    top_k: int
    recursive: bool
    inputs: tuple[str, ...]  # as named on the command line: rows hold the paths the walk made of them
    cwd: str | None  # where relative inputs were named from (None when all are absolute)

    @classmethod
    def of(cls, model: str | Path, invert: str, top_k: int, recursive: bool, roots: Sequence[str]) -> RunIdentity:
        from fmnist_onnx.files import sha256_file

        relative = any(not os.path.isabs(r) for r in roots)
        return cls(sha256_file(model), invert, top_k, recursive, tuple(roots), os.getcwd() if relative else None)

    @classmethod
    def from_json(cls, text: str) -> RunIdentity:
        """The record as written by ``to_json``; ValueError naming what is wrong with it otherwise."""
        try:
            raw = json.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deep") from None
        types = {"model_sha256": str, "invert": str, "top_k": int, "recursive": bool, "inputs": list,
                 "cwd": (str, type(None))}
        if type(raw) is not dict or set(raw) != set(types):
            raise ValueError(f"expected the fields {', '.join(types)}")
        for name, kind in types.items():
            if not isinstance(raw[name], kind) or (kind is int and type(raw[name]) is bool):
                raise ValueError(f"{name} is {type(raw[name]).__name__}")
        if not all(type(i) is str for i in raw["inputs"]):
            raise ValueError("inputs are not all text")
        return cls(**{**raw, "inputs": tuple(raw["inputs"])})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def differences(self, old: RunIdentity) -> list[str]:
        """What differs from the run that wrote the journal, in words."""
        diffs = []
        if self.model_sha256 != old.model_sha256:
            diffs.append(f"the model file (sha256 {old.model_sha256[:12]}... then, {self.model_sha256[:12]}... now)")
        if self.invert != old.invert:
            diffs.append(f"--invert ({old.invert} then, {self.invert} now)")
        if self.top_k != old.top_k:
            diffs.append(f"--top-k ({old.top_k} then, {self.top_k} now)")
        if self.recursive != old.recursive:
            diffs.append(f"--no-recursive ({'off' if old.recursive else 'on'} then, "
                         f"{'off' if self.recursive else 'on'} now)")
        if self.inputs != old.inputs:
            diffs.append(f"the inputs ({' '.join(old.inputs)} then, {' '.join(self.inputs)} now)")
        elif self.cwd != old.cwd:
            diffs.append(f"the folder relative inputs are named from ({old.cwd} then, {self.cwd} now)")
        return [visible(d) for d in diffs]


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
    the --report page. None of them is ever one of the run's inputs."""
    named = [os.fspath(report)] if report is not None else []
    if output == "-":
        return tuple(named)
    return (output, str(journal_path(output)), str(identity_path(output)), str(record_path(output)),
            str(lock_path(output)), str(confusion_png_path(output)), *named)


def _check_same_run(record: Path, identity: RunIdentity, what: Path) -> None:
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
        with os.fdopen(fd, "rb") as f:
            data = f.read(RECORD_MAX_BYTES + 1)
        if len(data) > RECORD_MAX_BYTES:
            raise ValueError(f"more than {RECORD_MAX_BYTES:,} bytes")
        old = RunIdentity.from_json(data.decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{record}: unreadable ({visible(e)}); use --overwrite to start over") from None
    diffs = identity.differences(old)
    if diffs:
        raise UserError(f"--resume: {what} was written by another run: {'; '.join(diffs)}. "
                        "Resume with the same model, options and inputs, or use --overwrite to start over")


def _write_identity(output: str, identity: RunIdentity) -> None:
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


def check_inputs(paths: Sequence[str | Path]) -> list[str]:
    if not paths:
        raise UserError("no PATH given: name folders or image files to classify")
    out = []
    for p in paths:
        s = os.fspath(p)
        if not os.path.lexists(s):
            raise UserError(f"{visible(s)}: no such file or folder")
        if os.path.islink(s) and not os.path.exists(s):
            raise UserError(f"{visible(s)}: dangling symbolic link")
        out.append(s)
    # a path named twice, or one inside a folder also named, would give its files two rows. Linear in the
    # number of paths (a shell glob can name 100,000 files), times the number of folders named.
    real = [os.path.realpath(s) for s in out]
    first: dict[str, int] = {}
    for i, r in enumerate(real):
        if r in first:
            raise UserError(f"{visible(out[i])} and {visible(out[first[r]])} are the same; name each file or "
                            "folder once")
        first[r] = i
    folders = [(r.rstrip(os.sep) + os.sep, i) for i, r in enumerate(real) if os.path.isdir(r)]
    for i, r in enumerate(real):
        for prefix, j in folders:
            if r.startswith(prefix):
                raise UserError(f"{visible(out[i])} is inside {visible(out[j])}; name each file or folder once")
    return out


def _check_not_inputs(own: Sequence[str], roots: Sequence[str], model: str) -> None:
    """No file the run writes may be the model or a file named as an input, even with --overwrite (files
    inside input folders are left out of the walk instead)."""
    named = [r for r in roots if not os.path.isdir(r)]
    if len(named) > 1000:  # a shell glob: compare real paths, not a stat per pair
        real = {os.path.realpath(r): r for r in named}
        named = [real[r] for r in (os.path.realpath(o) for o in own) if r in real]
    for out in own:
        for i in [model, *named]:
            if same_file(out, i):
                raise UserError(f"{visible(out)} would be written by this run but is also one of its inputs "
                                f"({visible(i)}); write the output elsewhere")


def check_request(paths: Sequence[str | Path], model: str | Path, output: str | Path = "-", fmt: str | None = None,
                  top_k: int = 1, batch_size: int | None = None, invert: str = "auto", recursive: bool = True,
                  resume: bool = False, overwrite: bool = False, provider: str = "auto",
                  report: str | Path | None = None, check_inputs=check_inputs) -> Request:
    """The checks every engine makes before any work, each a one-line UserError. The state of the output
    (a journal, a finished output) is checked under the output's lock: ``check_fresh``, ``resume_state``."""
    from fmnist_onnx.runtime import PROVIDER_CHOICES

    output = os.fspath(output)
    fmt = format_for(output, fmt)
    if not 1 <= top_k <= NUM_CLASSES:
        raise UserError(f"--top-k must be between 1 and {NUM_CLASSES}")
    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if invert not in images.INVERT_MODES:
        raise UserError(f"--invert must be one of {', '.join(images.INVERT_MODES)}")
    if provider not in PROVIDER_CHOICES:
        raise UserError(f"unknown provider {provider!r}; choose {', '.join(PROVIDER_CHOICES)}")
    if output == "-" and resume:
        raise UserError("--resume needs an --output file (stdout cannot be resumed)")
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    roots = check_inputs(paths)
    if not Path(model).is_file():
        raise UserError(f"model file not found: {model} (make one with `fmnist-onnx export`)")
    own = run_files(output, report)
    _check_not_inputs(own, roots, os.fspath(model))
    if output != "-":
        JournalSink.check_writable(output)  # a read-only folder, a device: refused before any work
    # the model's hash only where there is a journal to resume
    identity = RunIdentity.of(model, invert, top_k, recursive, roots) if output != "-" else None
    return Request(roots, os.fspath(model), output, fmt, top_k, batch_size, invert, recursive, resume, overwrite,
                   provider, identity, own)


def check_fresh(request: Request) -> None:
    """A run without --resume or --overwrite: nothing it would write may exist (the output, an interrupted
    run's journal, the confusion PNG). Under the output's lock, before any work."""
    if request.output == "-" or request.overwrite:
        return
    JournalSink.check_free(request.output)
    png = confusion_png_path(request.output)
    if os.path.lexists(png):
        raise UserError(f"{png} exists (this run would write its confusion matrix there); use --overwrite to "
                        "replace it")


# ---------------------------------------------------------------------------------------------- --resume

class _Walked:
    """The files this run's walk yields, as sorted 64-bit digests (8 bytes a file), and which of them rows
    read back name: --resume continues only rows for these files, each once."""

    def __init__(self, batches: Iterator[images.Batch]) -> None:
        keys: list[int] = []
        for batch in batches:
            if batch.unlistable is not None:  # a folder that cannot be listed has a row of its own
                keys.append(_path_key(batch.unlistable.path))
            keys += map(_path_key, batch.files)
        self.keys = np.unique(np.array(keys, dtype=np.uint64))
        self.seen = np.zeros(len(self.keys), dtype=bool)

    def mark(self, path: str) -> None:
        """RowRefused unless ``path`` is a walked file that no row named before."""
        key = np.uint64(_path_key(path))
        i = int(np.searchsorted(self.keys, key))
        if i == len(self.keys) or self.keys[i] != key:
            raise RowRefused(f"names {visible(path)}, which is not among this run's input files")
        if self.seen[i]:
            raise RowRefused(f"names {visible(path)} again (an earlier line has it)")
        self.seen[i] = True

    def done(self) -> _Done | None:
        return _Done(self.keys[self.seen]) if self.seen.any() else None

    def missing(self) -> int:
        return int(len(self.seen) - self.seen.sum())


def _walker(engine: str) -> Callable[..., Iterator[images.Batch]]:
    """The walk of ``engine`` (the same as its ``walk``), without starting the engine."""
    if engine == "ray":
        from fmnist_onnx.engines.ray import walk_batches

        return walk_batches
    return images.iter_batches


def resume_state(request: Request, tally: Tally, engine: str) -> tuple[ClassifySummary | None, JournalSink | None,
                                                                        _Done | None]:
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
        _check_same_run(identity_path(output), request.identity, journal)
        walked = _Walked(_walker(engine)(request.roots, request.recursive, request.own_files))

        def previous(row: dict) -> None:
            walked.mark(row["path"])
            tally.add_row(row)
            tally.resumed += 1

        sink = JournalSink.open(output, request.fmt, request.top_k, resume=True, on_previous_row=previous)
        return None, sink, walked.done()
    if os.path.lexists(output):
        return _finished(request, engine), None, None
    return None, None, None  # nothing to resume: a new run


def _finished(request: Request, engine: str) -> ClassifySummary:
    """--resume on a finished output: its summary, if this same run wrote it and it has a row for every file
    the inputs hold, once; else one line."""
    output = Path(request.output)
    record = record_path(output)
    if not os.path.lexists(record) and os.path.lexists(identity_path(output)):
        record = identity_path(output)  # the run ended between the output's rename and the record's
    _check_same_run(record, request.identity, output)
    walked = _Walked(_walker(engine)(request.roots, request.recursive, request.own_files))
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
    return _summary_of_finished(output, request.fmt, tally)


def _summary_of_finished(output: Path, fmt: str, tally: Tally) -> ClassifySummary:
    acc, per_class = tally.metrics()
    return ClassifySummary(str(output), fmt, "", 0, "", tally.classified + tally.failed, tally.classified,
                           tally.failed, 0, tally.classified + tally.failed, 0.0, 0.0, acc, per_class, None,
                           tally.failures, already_complete=True)


# ---------------------------------------------------------------------------------------------- the walk

def _path_key(path: str) -> int:
    # 64-bit digests: 8 bytes a row to remember what an interrupted run did (collision odds ~1e-8 at 1e6 files)
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class _Done:
    """Paths an interrupted run already wrote, as sorted 64-bit digests (memory: 8 bytes a file)."""

    def __init__(self, keys: list[int]) -> None:
        self.keys = np.unique(np.array(keys, dtype=np.uint64))

    def __contains__(self, path: str) -> bool:
        key = np.uint64(_path_key(path))
        i = int(np.searchsorted(self.keys, key))
        return i < len(self.keys) and self.keys[i] == key


@dataclass
class ChunkSizer:
    """How many files the next chunk holds: FIRST_CHUNK at first (first rows come at once), then about
    CHUNK_SECONDS of decoding, at most ``limit``, from what the engine says of the chunks decoded so far."""

    limit: int = MAX_CHUNK
    size: int = FIRST_CHUNK

    def observe(self, seconds: float, files: int) -> None:
        if seconds > 0 and files:
            self.size = int(min(self.limit, max(FIRST_CHUNK, CHUNK_SECONDS * files / seconds)))


def work_items(batches: Iterator[images.Batch], done: _Done | None, tally: Tally,
               sizer: ChunkSizer) -> Iterator[list[str] | Row]:
    """Chunks of paths to decode (list) and rows known without decoding (Row: an unlistable folder), in
    walk order. ``sizer.size`` is read at each chunk, so the engine can adapt it. List operations per
    folder, not Python statements per file: this runs in the process that walks and writes."""
    chunk: list[str] = []
    for batch in batches:
        tally.skipped += len(batch.skipped)
        if batch.unlistable is not None:
            if chunk:
                yield chunk
                chunk = []
            yield Row(batch.unlistable.path, error=batch.unlistable.error)
        files = batch.files if done is None else [p for p in batch.files if p not in done]
        start = 0
        while start < len(files):
            take = min(sizer.size - len(chunk), len(files) - start)
            chunk.extend(files[start:start + take])
            start += take
            if len(chunk) >= sizer.size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def open_sink(request: Request) -> JournalSink | StdoutSink:
    """A new sink for the output: stdout, or a new journal with the run's record beside it (written first).
    (--resume continues a journal in ``resume_state``.)"""
    if request.output == "-":
        return StdoutSink(request.top_k)
    _write_identity(request.output, request.identity)
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


# ---------------------------------------------------------------------------------------------- the driver

class Engine(Protocol):
    """What the pipeline needs of an engine (engines/local.py, engines/ray.py)."""

    provider: str  # the provider that runs the model (a name in runtime.PROVIDER_TABLE)
    workers: int  # decoding processes, or Ray actors
    decoder: str  # in words, for the summary
    max_chunk: int  # files a chunk of work_items holds at most

    def walk(self, roots: Sequence[str], recursive: bool, exclude: Sequence[str] = ()) -> Iterator[images.Batch]:
        """The files to classify, in batches; ``exclude``: the run's own files, left out wherever they lie."""

    def rows(self, items: Iterator[list[str] | Row], encoding: str,
             observe: Callable[[float, int], None]) -> Iterator[Rows]:
        """Rows for the work items, encoded for the sink; ``observe(seconds, files)`` after each chunk decoded
        (it sizes the chunks to come)."""

    def close(self) -> None: ...


def open_engine(name: str, request: Request, **options) -> Engine:
    """The engine ``name`` for ``request``; its framework is imported only here."""
    if name == "local":
        from fmnist_onnx.engines.local import LocalEngine

        return LocalEngine(request, **options)
    if name == "ray":
        from fmnist_onnx.engines.ray import RayEngine

        return RayEngine(request, **options)
    raise UserError(f"unknown engine {name!r}; choose {', '.join(ENGINES)}")


def classify(
    paths: Sequence[str | Path],
    model: str | Path,
    output: str | Path = "-",
    fmt: str | None = None,
    top_k: int = 1,
    batch_size: int | None = None,
    provider: str = "auto",
    invert: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    recursive: bool = True,
    progress: bool = False,
    on_provider=None,
    engine: str = "local",
    report: str | Path | None = None,
    **engine_options,
) -> ClassifySummary:
    """Classify every image file under ``paths`` into ``output`` ('-': CSV on stdout); see the module doc.
    ``engine_options`` go to the engine (local: workers, inference; ray: address, actors, check_inputs).
    ``on_provider(name)`` is called once the engine is ready (the CLI says which provider runs). ``report``:
    where the caller writes the run's report (the walk leaves it out). One run per output at a time: the
    output's lock (files.OutputLock) is held from before its journal is looked at to the end."""
    t0 = time.perf_counter()
    checker = engine_options.pop("check_inputs", check_inputs)
    request = check_request(paths, model, output, fmt, top_k, batch_size, invert, recursive, resume, overwrite,
                            provider, report, check_inputs=checker)
    with OutputLock(request.output) if request.output != "-" else contextlib.nullcontext():
        return _run(request, engine, progress, on_provider, engine_options, t0)


def _run(request: Request, engine: str, progress: bool, on_provider, engine_options: dict,
         t0: float) -> ClassifySummary:
    """The run, under the output's lock."""
    output = request.output
    sink = eng = old_int = done = None
    tally = Tally()
    old_term = install_sigterm()
    # From here on Ctrl-C raises KeyboardInterrupt, so that the engine stops (a local Ray runtime, the worker
    # processes) and the journal is closed cleanly
    if old_term is not None and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if request.resume:
            finished, sink, done = resume_state(request, tally, engine)
            if finished is not None:
                return finished
        else:
            check_fresh(request)
        pause_point("classify.before_engine")  # tests hold the run here (testing.py)
        eng = open_engine(engine, request, **engine_options)
        if on_provider is not None:
            on_provider(eng.provider)
        pause_point("classify.engine_ready")
        sink = sink or open_sink(request)
        final = _pipeline(request, eng, sink, done, tally, progress)
    except BaseException as e:
        close_on_error(sink, e)  # Ctrl-C and SIGTERM leave here as Interrupted
        _after_failure(request, sink, tally, e)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)
        if eng is not None:
            eng.close()
    return summarize(tally, final, output, request.fmt, eng.provider, eng.workers, eng.decoder,
                     time.perf_counter() - t0, replace=request.overwrite or request.resume)


def _pipeline(request: Request, eng: Engine, sink: JournalSink | StdoutSink, done: _Done | None, tally: Tally,
              progress: bool) -> str | Path:
    """The walk -> the engine -> the sink, counted in ``tally``; the final output."""
    bar = progress_bar(progress, tally.resumed)
    sizer = ChunkSizer(eng.max_chunk)
    items = work_items(eng.walk(request.roots, request.recursive, request.own_files), done, tally, sizer)
    for rows in eng.rows(items, sink.encoding, sizer.observe):
        sink.write_encoded(rows.data)
        pause_point("classify.after_chunk")  # tests hold the run here (testing.py)
        tally.add_rows(rows)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return finish_sink(sink, request.output)


def _after_failure(request: Request, sink, tally: Tally, e: BaseException) -> None:
    """A run that failed: a new journal without a row goes (the engine could not start, the model failed on
    the first chunk: nothing to resume); a model that failed mid-run says where its rows are kept."""
    rows = tally.classified + tally.failed
    if not isinstance(e, UserError) or isinstance(e, OutputError) or not isinstance(sink, JournalSink):
        return
    if not rows and not request.resume:
        with contextlib.suppress(UserError):  # best effort: the error on its way out is the one to tell
            remove_own(journal_path(request.output))
            remove_own(identity_path(request.output))
    elif isinstance(e, ModelRunError):
        raise ModelRunError(f"{e}. The {rows:,} rows so far are kept in {sink.journal}: free some memory (or give "
                            "a smaller --batch-size) and run the same command with --resume") from None


def decoder_name() -> str:
    return "libspng (PNG) + Pillow" if images.pyspng is not None else "Pillow"


def summarize(tally: Tally, final: str | Path, output: str, fmt: str, provider: str, workers: int, decoder: str,
              seconds: float, replace: bool = False) -> ClassifySummary:
    """The summary of a finished run (any engine), with the confusion-matrix PNG in the ImageFolder layout.
    ``replace``: the run may replace an existing PNG (--overwrite, or the --resume of a run that could)."""
    acc, per_class = tally.metrics()
    png = None
    if per_class is not None and output != "-":
        png = _confusion_png(tally, output, acc, replace)
    elif output != "-" and replace:
        try:
            remove_own(confusion_png_path(output))  # an earlier run's would describe other rows
        except UserError as e:  # the table is written: the picture is extra
            log.warning("%s", e)
    new = tally.classified + tally.failed - tally.resumed
    return ClassifySummary(
        output=str(final), format=fmt, provider=provider, workers=workers, decoder=decoder,
        files=tally.classified + tally.failed, classified=tally.classified, failed=tally.failed,
        skipped=tally.skipped, resumed=tally.resumed, seconds=round(seconds, 3),
        images_per_s=round(new / seconds, 1) if seconds > 0 else 0.0, accuracy_pct=acc, per_class=per_class,
        confusion_png=str(png) if png else None, failures=tally.failures,
    )


class _Terminated(Exception):
    pass


def close_on_error(sink, e: BaseException) -> None:
    """After an exception in a run: close the sink (its journal stays, for --resume); Ctrl-C and SIGTERM become
    Interrupted. The caller re-raises anything else."""
    if sink is not None:
        sink.close()
    if isinstance(e, (KeyboardInterrupt, _Terminated)):
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        raise Interrupted(signum, getattr(sink, "journal", None)) from None


def install_sigterm():
    """SIGTERM ends the run like Ctrl-C: rows written so far stay in the journal."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


def progress_bar(progress: bool, initial: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(unit="img", initial=initial, desc="classify", dynamic_ncols=True, smoothing=0.1)


def _confusion_png(tally: Tally, output: str, acc: float | None, replace: bool) -> Path | None:
    """The confusion matrix beside the output, written atomically (files.atomic_write: a link at its name is
    replaced, never followed), replacing a file there only where the run may."""
    from fmnist_onnx.plots import confusion_matrix  # Pillow only: works on the inference-only install too

    path = confusion_png_path(output)
    try:
        confusion_matrix(tally.confusion, CLASSES, path, title=f"{Path(output).name}: accuracy {acc:.2f}%",
                         overwrite=replace)
    except (OSError, UserError) as e:  # a full disk, or a file put there meanwhile: the table is written, the
        log.warning("cannot write %s: %s", path, getattr(e, "strerror", None) or e)  # picture is extra
        return None
    return path


def format_summary(s: ClassifySummary) -> str:
    """The summary as a person reads it. Names and errors come from outside: shown with control and
    bidirectional characters as visible escapes (text.visible), never raw on a terminal."""
    lines = []
    output = visible(s.output)
    if s.already_complete:
        lines.append(f"{output} is complete already: {s.files} rows.")
    else:
        skipped = f", {s.skipped} other files skipped" if s.skipped else ""
        resumed = f", {s.resumed} of them from the interrupted run" if s.resumed else ""
        lines.append(f"{s.classified} of {s.files} files classified, {s.failed} failed{skipped}{resumed}.")
        if not s.files:
            lines.append("No image files found (inputs are the suffixes Pillow reads: .png, .jpg, .bmp, .webp, ...).")
        lines.append(f"{s.seconds:.2f} s, {s.images_per_s:,.0f} images/s ({s.provider}, {s.workers} decoding "
                     f"processes, {s.decoder}); wrote {output}")
    if s.accuracy_pct is not None:
        lines.append(f"accuracy {s.accuracy_pct:.2f}% (ImageFolder layout: true class from the folder names)")
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
