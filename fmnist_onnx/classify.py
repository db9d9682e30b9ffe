"""classify: folders of images -> a table of predictions, one row per file, with onnxruntime.

The pipeline: the parent walks the folders (streamed, sorted) and cuts the file list into chunks; worker
processes read and decode each chunk (reading and decoding are most of the cost: threads would not help
such small images) and, on the CPU, run the model on it too and encode its rows; the parent collects the
chunks in order and appends them to the journal (see sinks.py). With CUDA the workers only decode and the
parent runs the model, in big batches. No torch here.

Chunks adapt to the images: small at first (first rows come at once), then about a quarter second of work
each, at most 2048 files: big photos are journaled often, tiny PNGs go in big chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.errors import UserError
from fmnist_onnx.sinks import JournalSink, Row, StdoutSink, encode, format_for, journal_path, read_rows
from fmnist_onnx.spec import CLASSES, NUM_CLASSES

log = logging.getLogger(__name__)

FIRST_CHUNK = 64
MAX_CHUNK = 2048
CHUNK_SECONDS = 0.25
CRASHED = "the decoder crashed on this file (its worker process died)"
NON_FINITE = "the model gave non-finite logits (NaN or infinity) for this image"


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


class Tally:
    """Counts, and a confusion matrix for files in the ImageFolder layout."""

    def __init__(self) -> None:
        self.classified = self.failed = self.skipped = self.resumed = 0
        self.unlabelled = 0
        self.confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)  # [true, predicted]
        self.failures: list[dict] = []
        self._truth: dict[str, int | None] = {}

    def add(self, path: str, index: int | None, error: str | None) -> None:
        if error:
            self.failed += 1
            if len(self.failures) < 10:
                self.failures.append({"path": path, "error": error})
            return
        self.classified += 1
        # files of a folder share their class: look it up once per folder
        folder = path[:max(path.rfind("/"), path.rfind(os.sep))]
        truth = self._truth.get(folder, -1)
        if truth == -1:
            truth = self._truth[folder] = images.true_class(path)
        if truth is None:
            self.unlabelled += 1
        else:
            self.confusion[truth, index] += 1

    def add_row(self, row: dict) -> None:
        self.add(row["path"], row.get("index"), row.get("error"))

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


# ---------------------------------------------------------------------------------------------- workers

def _worker_init(parent: int | None = None) -> None:
    # Ctrl-C goes to the whole process group: the parent handles it, workers finish their chunk quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed alone (SIGKILL, the OOM killer) would leave its workers waiting forever on their queue:
    # on Linux, have the kernel kill a worker when its parent dies.
    if parent is not None and sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)


@dataclass(frozen=True)
class _Infer:
    """What a worker needs to run the model itself, on the CPU: its rows then come back encoded."""

    model: str
    top_k: int
    batch_size: int
    encoding: str  # the sink's text format: csv or jsonl


@dataclass
class _Chunk:
    """A worker's answer: decoded images for the parent to classify (``data`` None), or encoded rows."""

    errors: list[str]
    seconds: float
    images: np.ndarray | None = None
    data: bytes | None = None  # encoded rows, as the sink writes them
    indices: list[int | None] | None = None  # top-1 class of each row, for the summary


_worker_sessions: dict[str, object] = {}  # per worker process: one onnxruntime session per model


def _decode_chunk(paths: Sequence[str], invert: str, infer: _Infer | None = None) -> _Chunk:
    """Runs in a worker: decode the chunk; with ``infer``, also classify it and encode its rows."""
    t0 = time.perf_counter()
    imgs, errors = images.preprocess_batch(paths, invert)
    if infer is None:
        return _Chunk(errors, time.perf_counter() - t0, images=imgs)
    session = _worker_sessions.get(infer.model)
    if session is None:
        from fmnist_onnx.runtime import open_session

        session = _worker_sessions[infer.model] = open_session(infer.model, "cpu", threads=1)
    rows = predict_rows(session, paths, imgs, errors, infer.top_k, infer.batch_size)
    data = encode(rows, infer.encoding, infer.top_k)
    return _Chunk([r.error for r in rows], time.perf_counter() - t0, data=data,  # rows' errors: NaN logits too
                  indices=[r.indices[0] if r.indices else None for r in rows])


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _Pool:
    """Worker processes, restarted when one dies (a decoder crash or the OOM killer), never hanging."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # fork: workers start in milliseconds. Forked before onnxruntime starts its threads (see classify).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.ctx = multiprocessing.get_context(method)
        self.executor: ProcessPoolExecutor | None = None
        self.infer: _Infer | None = None  # set: the workers run the model too
        self.start()

    def start(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = ProcessPoolExecutor(self.workers, mp_context=self.ctx, initializer=_worker_init,
                                            initargs=(os.getpid(),))
        self.executor.submit(os.getpid).result()  # all workers exist from here on

    def submit(self, paths: Sequence[str], invert: str, decode_only: bool = False) -> Future:
        """A future of ``_decode_chunk``; one that raises BrokenProcessPool if the pool is already broken
        (a worker died since: the caller finds out where it collects results, in order)."""
        try:
            return self.executor.submit(_decode_chunk, paths, invert, None if decode_only else self.infer)
        except BrokenProcessPool as e:
            broken: Future = Future()
            broken.set_exception(e)
            return broken

    def isolate(self, paths: Sequence[str], invert: str) -> tuple[np.ndarray, list[str]]:
        """Decode a chunk that was in a dying pool file by file, each alone in the pool, so that a file
        that kills its worker is named and the others are decoded."""
        out = np.zeros((len(paths), images.IMAGE_SIZE, images.IMAGE_SIZE), dtype=np.uint8)
        errors = [""] * len(paths)
        for i, path in enumerate(paths):
            try:
                res = self.submit([path], invert, decode_only=True).result()
                out[i], errors[i] = res.images[0], res.errors[0]
            except BrokenProcessPool:
                log.warning("%s: %s", path, CRASHED)
                errors[i] = CRASHED
                self.start()
        return out, errors

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


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


def _work_items(found: Iterator[images.Found], done: _Done | None, tally: Tally,
                chunk_size: list[int]) -> Iterator[list[str] | Row]:
    """Chunks of paths to decode (list) and rows known without decoding (Row: an unlistable folder), in
    walk order. ``chunk_size[0]`` is read at each chunk, so the caller can adapt it."""
    chunk: list[str] = []
    for f in found:
        if f.kind == "skip":
            tally.skipped += 1
            continue
        if done is not None and f.path in done:
            continue
        if f.kind == "unlistable":
            if chunk:
                yield chunk
                chunk = []
            yield Row(f.path, error=f.error)
            continue
        chunk.append(f.path)
        if len(chunk) >= chunk_size[0]:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------- the model

def predict_rows(session, paths: Sequence[str], imgs: np.ndarray, errors: Sequence[str], top_k: int,
                 batch_size: int) -> list[Row]:
    """Rows for a decoded chunk: top-k classes by logit (ties: lowest index, as argmax) with softmax scores."""
    ok = np.flatnonzero(np.array([not e for e in errors], dtype=bool))
    rows = [Row(p, error=e) if e else None for p, e in zip(paths, errors, strict=True)]
    if len(ok):
        x = images.to_model_input(imgs[ok])
        logits = np.concatenate([session.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():  # a broken model: NaN would sort as a class and score nan; it is an error row
            for i in ok[~finite].tolist():
                rows[i] = Row(paths[i], error=NON_FINITE)
            ok, logits = ok[finite], logits[finite]
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        scores = np.take_along_axis(probs, order, axis=1)
        for i, idx, sc in zip(ok.tolist(), order.tolist(), scores.tolist(), strict=True):
            rows[i] = Row(paths[i], idx, sc)
    return rows


# ---------------------------------------------------------------------------------------------- the driver

def _check_inputs(paths: Sequence[str | Path]) -> list[str]:
    if not paths:
        raise UserError("no PATH given: name folders or image files to classify")
    out = []
    for p in paths:
        s = os.fspath(p)
        if not os.path.lexists(s):
            raise UserError(f"{s}: no such file or folder")
        if os.path.islink(s) and not os.path.exists(s):
            raise UserError(f"{s}: dangling symbolic link")
        out.append(s)
    # a path named twice, or one inside a folder also named, would give its files two rows. Linear in the
    # number of paths (a shell glob can name 100,000 files), times the number of folders named.
    real = [os.path.realpath(s) for s in out]
    first: dict[str, int] = {}
    for i, r in enumerate(real):
        if r in first:
            raise UserError(f"{out[i]} and {out[first[r]]} are the same; name each file or folder once")
        first[r] = i
    folders = [(r.rstrip(os.sep) + os.sep, i) for i, r in enumerate(real) if os.path.isdir(r)]
    for i, r in enumerate(real):
        for prefix, j in folders:
            if r.startswith(prefix):
                raise UserError(f"{out[i]} is inside {out[j]}; name each file or folder once")
    return out


@dataclass(frozen=True)
class RunIdentity:
    """What decides an output's rows: ``--resume`` continues only the run that wrote the journal.

    Kept beside the journal as ``<output>.partial.run.json``, written before the journal exists and removed
    when the output is complete. Options that do not change a row (workers, batch size, provider, engine)
    are not part of it."""

    model_sha256: str
    invert: str
    top_k: int
    recursive: bool
    inputs: tuple[str, ...]  # as named on the command line: rows hold the paths the walk made of them
    cwd: str | None  # where relative inputs were named from (None when all are absolute)

    @classmethod
    def of(cls, model: str | Path, invert: str, top_k: int, recursive: bool, roots: Sequence[str]) -> RunIdentity:
        digest = hashlib.sha256()
        with open(model, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        relative = any(not os.path.isabs(r) for r in roots)
        return cls(digest.hexdigest(), invert, top_k, recursive, tuple(roots), os.getcwd() if relative else None)

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
        return diffs


def identity_path(output: str | Path) -> Path:
    journal = journal_path(output)
    return journal.with_name(journal.name + ".run.json")


def _check_same_run(output: str, identity: RunIdentity) -> None:
    """--resume: UserError unless the journal of ``output`` was written by this same run."""
    if not journal_path(output).exists():
        return
    path = identity_path(output)
    try:
        raw = json.loads(path.read_text())
        old = RunIdentity(**{**raw, "inputs": tuple(raw["inputs"])})
    except FileNotFoundError:
        raise UserError(f"{journal_path(output)}: no record of the run that wrote it ({path.name} is missing); "
                        "use --overwrite to start over") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: unreadable ({e}); use --overwrite to start over") from None
    diffs = identity.differences(old)
    if diffs:
        raise UserError(f"--resume: {journal_path(output)} was written by another run: {'; '.join(diffs)}. "
                        "Resume with the same model, options and inputs, or use --overwrite to start over")


def _write_identity(output: str, identity: RunIdentity) -> None:
    from fmnist_onnx.files import atomic_write_text

    atomic_write_text(identity_path(output), json.dumps(asdict(identity), indent=1) + "\n")


def _summary_of_finished(output: Path, fmt: str) -> ClassifySummary:
    tally = Tally()
    for row in read_rows(output):
        tally.add_row(row)
    acc, per_class = tally.metrics()
    return ClassifySummary(str(output), fmt, "", 0, "", tally.classified + tally.failed, tally.classified,
                           tally.failed, 0, tally.classified + tally.failed, 0.0, 0.0, acc, per_class, None,
                           tally.failures, already_complete=True)


def check_request(paths: Sequence[str | Path], model: str | Path, output: str, fmt: str | None, top_k: int,
                  invert: str, resume: bool, overwrite: bool, check_inputs=_check_inputs, recursive: bool = True,
                  ) -> tuple[list[str], str, ClassifySummary | None, RunIdentity]:
    """The checks every engine (local, Ray) makes before any work, each a one-line UserError. Returns the
    inputs (checked by ``check_inputs``), the table format, when --resume finds the output complete
    already its summary (then there is nothing to do), and the run's identity (for ``open_sink``)."""
    fmt = format_for(output, fmt)
    if not 1 <= top_k <= NUM_CLASSES:
        raise UserError(f"--top-k must be between 1 and {NUM_CLASSES}")
    if invert not in images.INVERT_MODES:
        raise UserError(f"--invert must be one of {', '.join(images.INVERT_MODES)}")
    if output == "-" and resume:
        raise UserError("--resume needs an --output file (stdout cannot be resumed)")
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    roots = check_inputs(paths)
    if not Path(model).is_file():
        raise UserError(f"model file not found: {model} (make one with `fmnist-onnx export`)")
    identity = RunIdentity.of(model, invert, top_k, recursive, roots)
    if resume and Path(output).exists() and not journal_path(output).exists():
        log.info("%s is complete already", output)
        return roots, fmt, _summary_of_finished(Path(output), fmt), identity
    if output != "-" and not overwrite and not resume:
        JournalSink.check_free(output)  # refuse before any work
    if resume:
        _check_same_run(output, identity)
    return roots, fmt, None, identity


def open_sink(output: str, fmt: str, top_k: int, resume: bool, overwrite: bool,
              tally: Tally, identity: RunIdentity) -> tuple[JournalSink | StdoutSink, _Done | None]:
    """The output's sink. With --resume, the interrupted run's rows are counted in ``tally`` and their paths
    come back as a _Done set, for the caller to skip (None when there are none). A new journal gets its
    run's identity beside it first (``check_request`` checked it on --resume)."""
    done_keys: list[int] = []

    def previous(row: dict) -> None:
        tally.add_row(row)
        tally.resumed += 1
        done_keys.append(_path_key(row["path"]))

    if output == "-":
        return StdoutSink(top_k), None
    if overwrite or not journal_path(output).exists():
        _write_identity(output, identity)
    sink = JournalSink.open(output, fmt, top_k, resume, overwrite, on_previous_row=previous)
    return sink, (_Done(done_keys) if done_keys else None)


def finish_sink(sink: JournalSink | StdoutSink, output: str) -> str | Path:
    """The complete output; its journal and the journal's run record are gone."""
    final = sink.finish()
    if output != "-":
        identity_path(output).unlink(missing_ok=True)
    return final


def confusion_png_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".confusion.png")


def classify(
    paths: Sequence[str | Path],
    model: str | Path,
    output: str | Path = "-",
    fmt: str | None = None,
    top_k: int = 1,
    batch_size: int = 512,
    workers: int | None = None,
    provider: str = "auto",
    invert: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    recursive: bool = True,
    progress: bool = False,
    on_provider=None,
) -> ClassifySummary:
    """Classify every image file under ``paths`` into ``output`` ('-': CSV on stdout); see the module doc.
    ``on_provider(name)`` is called once the session is open (the CLI says which provider runs)."""
    t0 = time.perf_counter()
    output = os.fspath(output)
    roots, fmt, finished, identity = check_request(paths, model, output, fmt, top_k, invert, resume, overwrite,
                                                   recursive=recursive)
    if finished is not None:
        return finished
    workers = workers or default_workers()

    # Fork the workers before onnxruntime starts its thread pool: forking a process with threads is unsafe.
    pool = _Pool(workers)
    sink = old_int = None
    old_term = _install_sigterm()
    try:
        from fmnist_onnx.runtime import open_session

        # One intra-op thread: the workers keep the other cores busy, and onnxruntime's spinning threads
        # would only take CPU time from them (measured: 14 us of CPU per image on one thread, 23 on two).
        session = open_session(model, provider, threads=1)
        if on_provider is not None:
            on_provider(session.provider)
        tally = Tally()
        # From here on there is a journal to keep: Ctrl-C raises KeyboardInterrupt, which closes it cleanly
        if old_term is not None and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        sink, done = open_sink(output, fmt, top_k, resume, overwrite, tally, identity)
        if session.provider == "cpu":
            # The workers run the model too, on one thread each, and send back encoded rows: the parent is
            # then left with walking and writing, and is no longer the bottleneck (measured: ~13 us of CPU per
            # image for the model, ~20 for reading and decoding). On CUDA the parent runs it, in big batches.
            pool.infer = _Infer(os.fspath(model), top_k, batch_size, sink.encoding)
        bar = _progress_bar(progress, tally.resumed)
        chunk_size = [FIRST_CHUNK]
        items = _work_items(images.iter_files(roots, recursive), done, tally, chunk_size)
        window: deque = deque()  # (paths, future) or (None, Row), in walk order
        depth = 2 * workers + 1  # chunks in flight: workers never wait for the parent

        def feed() -> None:
            while len(window) < depth:
                item = next(items, None)
                if item is None:
                    return
                if isinstance(item, Row):
                    window.append((None, item))
                else:
                    window.append((item, pool.submit(item, invert)))

        feed()
        while window:
            chunk, fut = window.popleft()
            if chunk is None:
                rows = [fut]
            else:
                try:
                    res = fut.result()
                    # about CHUNK_SECONDS of work per chunk from now on
                    per_file = res.seconds / len(chunk)
                    chunk_size[0] = int(min(MAX_CHUNK, max(FIRST_CHUNK, CHUNK_SECONDS / max(per_file, 1e-6))))
                except BrokenProcessPool:
                    log.warning("a worker process died; decoding its chunk file by file")
                    pool.start()
                    imgs, errors = pool.isolate(chunk, invert)
                    res = _Chunk(errors, 0.0, images=imgs)
                    window = deque((c, pool.submit(c, invert) if c is not None else f) for c, f in window)
                feed()  # keep the workers busy while this chunk is written (and classified, on CUDA)
                if res.data is not None:
                    sink.write_encoded(res.data)
                    for path, index, error in zip(chunk, res.indices, res.errors, strict=True):
                        tally.add(path, index, error)
                    if bar is not None:
                        bar.update(len(chunk))
                    continue
                rows = predict_rows(session, chunk, res.images, res.errors, top_k, batch_size)
            sink.write(rows)
            for r in rows:
                tally.add(r.path, r.indices[0] if r.indices else None, r.error)
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        final = finish_sink(sink, output)
    except BaseException as e:
        close_on_error(sink, e)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)
        pool.close()

    return summarize(tally, final, output, fmt, session.provider, workers, decoder_name(),
                     time.perf_counter() - t0)


def decoder_name() -> str:
    return "libspng (PNG) + Pillow" if images.pyspng is not None else "Pillow"


def summarize(tally: Tally, final: str | Path, output: str, fmt: str, provider: str, workers: int, decoder: str,
              seconds: float) -> ClassifySummary:
    """The summary of a finished run (any engine), with the confusion-matrix PNG in the ImageFolder layout."""
    acc, per_class = tally.metrics()
    png = None
    if per_class is not None and output != "-":
        png = _confusion_png(tally, output, acc)
    elif output != "-":
        confusion_png_path(output).unlink(missing_ok=True)  # an earlier run's would describe other rows
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


def _install_sigterm():
    """SIGTERM ends the run like Ctrl-C: rows written so far stay in the journal."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _progress_bar(progress: bool, initial: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(unit="img", initial=initial, desc="classify", dynamic_ncols=True, smoothing=0.1)


def _confusion_png(tally: Tally, output: str, acc: float | None) -> Path | None:
    from fmnist_onnx.plots import confusion_matrix  # Pillow only: works on the inference-only install too

    path = confusion_png_path(output)
    try:
        confusion_matrix(tally.confusion, CLASSES, path, title=f"{Path(output).name}: accuracy {acc:.2f}%")
    except OSError as e:  # a full disk or a read-only folder: the table is written, the picture is extra
        log.warning("cannot write %s: %s", path, e)
        return None
    return path


def format_summary(s: ClassifySummary) -> str:
    """The summary as a person reads it."""
    lines = []
    if s.already_complete:
        lines.append(f"{s.output} is complete already: {s.files} rows.")
    else:
        skipped = f", {s.skipped} other files skipped" if s.skipped else ""
        resumed = f", {s.resumed} of them from the interrupted run" if s.resumed else ""
        lines.append(f"{s.classified} of {s.files} files classified, {s.failed} failed{skipped}{resumed}.")
        if not s.files:
            lines.append("No image files found (inputs are the suffixes Pillow reads: .png, .jpg, .bmp, .webp, ...).")
        lines.append(f"{s.seconds:.2f} s, {s.images_per_s:,.0f} images/s ({s.provider}, {s.workers} decoding "
                     f"processes, {s.decoder}); wrote {s.output}")
    if s.accuracy_pct is not None:
        lines.append(f"accuracy {s.accuracy_pct:.2f}% (ImageFolder layout: true class from the folder names)")
        lines.append(f"  {'class':<12} {'precision':>9} {'recall':>7} {'files':>7}")
        for m in s.per_class or []:
            p = f"{m.precision:.3f}" if m.precision is not None else "-"
            r = f"{m.recall:.3f}" if m.recall is not None else "-"
            lines.append(f"  {m.label:<12} {p:>9} {r:>7} {m.support:>7}")
    if s.confusion_png:
        lines.append(f"confusion matrix: {s.confusion_png}")
    if s.failed:
        lines.append(f"failed files ({'first ' + str(len(s.failures)) if s.failed > len(s.failures) else 'all'}):")
        lines += [f"  {f['path']}: {f['error']}" for f in s.failures]
    return "\n".join(lines)
