"""classify: images -> a table of predictions, one row per image, with onnxruntime. The driver, the same for
every engine and source:

1. the request and its checks (request.py): inputs, model, options, output, each a one-line UserError before
   any work; then, holding the output's lock (one run per output at a time), its state: nothing to clobber
   (``check_fresh``), or on --resume that the journal, or the finished output, was written by this same run
   and holds only rows this run writes (resume.py);
2. the walk (sources/): streamed, sorted, cut into chunks (``work_items``); units an interrupted run wrote
   already are skipped, and the run's own files are left out wherever they lie: a run never reads its outputs;
3. the engine (engines/, chosen by name from its registry): chunks -> ``Rows`` (encoded as the sink writes
   them, with their top-1 classes and true classes as arrays);
4. the sink (outputs.py, journal.py): rows appended to a journal that becomes the output only when complete;
5. the summary (tally.py): counts, accuracy and the confusion matrix in the ImageFolder layout.

The process that walks and writes handles arrays and bytes per chunk, not a Python object per file: that
is what keeps it off the critical path on many cores. No torch here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist_onnx.classify import engines, sources
from fmnist_onnx.classify.contract import (
    CHUNK_BYTES,
    CHUNK_SECONDS,
    FIRST_CHUNK,
    MAX_CHUNK,
    Batch,
    ClassifySummary,
    Engine,
    Members,
    Request,
)
from fmnist_onnx.classify.outputs import finish_sink, identity_path, open_sink
from fmnist_onnx.classify.request import check_fresh, check_request
from fmnist_onnx.classify.resume import Done, resume_state
from fmnist_onnx.classify.tally import Tally, summarize
from fmnist_onnx.errors import Interrupted, UserError
from fmnist_onnx.files import LockLost, OutputError, OutputLock, check_locks, remove_own
from fmnist_onnx.journal import JournalSink, journal_path
from fmnist_onnx.runtime import ModelRunError
from fmnist_onnx.signals import StopSignals, signum_of
from fmnist_onnx.stdout_sink import StdoutSink
from fmnist_onnx.table import Row
from fmnist_onnx.testing import CLASSIFY_AFTER_CHUNK, CLASSIFY_BEFORE_ENGINE, CLASSIFY_ENGINE_READY, pause_point


@dataclass
class ChunkSizer:
    """How many files the next chunk holds: FIRST_CHUNK at first (first rows come at once), then about
    CHUNK_SECONDS of decoding, at most ``limit``, from what the engine says of the chunks decoded so far."""

    limit: int = MAX_CHUNK
    size: int = FIRST_CHUNK

    def observe(self, seconds: float, files: int) -> None:
        if seconds > 0 and files:
            self.size = int(min(self.limit, max(FIRST_CHUNK, CHUNK_SECONDS * files / seconds)))


def work_items(batches: Iterator[Batch], done: Done | None, tally: Tally,
               sizer: ChunkSizer) -> Iterator[list[str] | Members | Row]:
    """Chunks of paths to decode (list), of a container's images (Members: never mixed with loose files), and
    rows known without decoding (Row: an unlistable folder, a damaged archive), in walk order. ``sizer.size``
    is read at each chunk, so the engine can adapt it. List operations per folder, not Python statements per
    file: this runs in the process that walks and writes."""
    chunk: list[str] = []
    for batch in batches:
        tally.skipped += len(batch.skipped)
        if batch.kinds:
            tally.skipped_kinds.update(batch.kinds)
        if chunk and (batch.unlistable is not None or batch.members is not None):
            yield chunk
            chunk = []
        if batch.members is not None:
            yield from _member_chunks(batch.members, done, sizer)
        if batch.unlistable is not None:
            yield Row(batch.unlistable.path, error=batch.unlistable.error)
        if batch.members is not None:
            del batch  # a compressed tar's members go before the walk reads the next ones
            continue
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


def _member_chunks(members: Members, done: Done | None, sizer: ChunkSizer) -> Iterator[Members]:
    """A container's images in chunks of ``sizer.size`` at most, and of CHUNK_BYTES of declared member bytes at
    most (or one member bigger than that): 64 members declaring 250 MB each are 64 chunks, not 16 GB in one."""
    if done is not None:
        members = members.keep([u not in done for u in members.units])
    ends = np.cumsum(np.asarray(members.sizes, np.int64)) if len(members.sizes) else None
    start = 0
    while start < len(members):
        stop = min(start + sizer.size, len(members))
        if ends is not None:
            before = int(ends[start - 1]) if start else 0
            stop = max(start + 1, min(stop, int(np.searchsorted(ends, before + CHUNK_BYTES, "right"))))
        yield members.take(start, stop)
        start = stop


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
    image_column: str | None = None,
    **engine_options,
) -> ClassifySummary:
    """Classify every image file under ``paths`` into ``output`` ('-': CSV on stdout); see the module doc.
    ``engine``: a name in engines.ENGINES; ``engine_options`` go to it (local: workers, inference, stages; ray:
    address, actors).
    ``on_provider(name)`` is called once the engine is ready (the CLI says which provider runs). ``report``:
    where the caller writes the run's report (the walk leaves it out). ``image_column``: the Parquet inputs'
    column of images (--image-column; None: the source's rule). One run per output at a time: the
    output's lock (files.OutputLock) is held from before its journal is looked at to the end."""
    t0 = time.perf_counter()
    request = check_request(paths, model, output, fmt, top_k, batch_size, invert, recursive, resume, overwrite,
                            provider, report, engine, image_column)
    with OutputLock(request.output) if request.output != "-" else contextlib.nullcontext():
        return _run(request, engine, progress, on_provider, engine_options, t0)


def _run(request: Request, engine: str, progress: bool, on_provider, engine_options: dict,
         t0: float) -> ClassifySummary:
    """The run, under the output's lock. Ctrl-C and SIGTERM raise where the run is (signals.StopSignals), so
    that the engine stops (a local Ray runtime, the worker processes) and the journal is closed cleanly; they
    leave as errors.Interrupted."""
    sink = eng = done = None
    tally = Tally()
    try:
        with StopSignals(raises=True):
            if request.resume:
                finished, sink, done = resume_state(request, tally)
                if finished is not None:
                    return finished
            else:
                check_fresh(request)
            pause_point(CLASSIFY_BEFORE_ENGINE)  # tests hold the run here, before the walk (testing.py)
            # the engine's processes are forked before the walk reads any member's bytes: a fork after it would
            # hold a compressed tar's first member in every worker for the whole run
            with engines.open_engine(engine, request, **engine_options) as eng:
                seen = sources.Seen()
                walk = _found(sources.walk(request.roots, request.recursive, request.own_files,
                                           request.image_column, seen), tally, seen, request.roots)
                if on_provider is not None:
                    on_provider(eng.provider)
                pause_point(CLASSIFY_ENGINE_READY)
                sink = sink or open_sink(request)
                final = _pipeline(request, eng, sink, done, tally, progress, walk)
                tally.beside = (seen.beside_count, seen.beside)
    except BaseException as e:
        _lock_still_held(sink)
        close_on_error(sink, e)  # Ctrl-C and SIGTERM leave here as Interrupted
        _after_failure(request, sink, tally, e)
        raise
    return summarize(tally, final, request.output, request.fmt, eng.provider, eng.workers, eng.decoder,
                     time.perf_counter() - t0, replace=request.overwrite or request.resume,
                     provider_reason=getattr(eng, "provider_reason", None))


def _found(walk: Iterator[Batch], tally: Tally, seen: sources.Seen, roots: Sequence[str]) -> Iterator[Batch]:
    """The walk, once it has given something with a row (a file, or an error row), before the provider line
    and before anything is written; the files skipped until then counted in ``tally``. Inputs with no image and no
    error row are a UserError saying what they hold: not an empty table and exit 0."""
    for batch in walk:
        if batch.files or batch.unlistable is not None:
            return _then([batch], walk)
        tally.skipped += len(batch.skipped)
    raise UserError(seen.nothing(roots))


def _then(first: list[Batch], walk: Iterator[Batch]) -> Iterator[Batch]:
    """``first``'s one batch, then the walk's, holding none of them: itertools.chain([batch], walk) would keep
    the first batch (a compressed tar's member bytes) for the whole run."""
    yield first.pop()
    yield from walk


def _pipeline(request: Request, eng: Engine, sink: JournalSink | StdoutSink, done: Done | None, tally: Tally,
              progress: bool, walk: Iterator[Batch]) -> str | Path:
    """The walk -> the engine -> the sink, counted in ``tally``; the final output."""
    bar = progress_bar(progress, tally.resumed)
    sizer = ChunkSizer(eng.max_chunk)
    items = work_items(walk, done, tally, sizer)
    for rows in eng.rows(items, sink.encoding, sizer.observe):
        sink.write_encoded(rows.data)
        pause_point(CLASSIFY_AFTER_CHUNK)  # tests hold the run here (testing.py)
        tally.add_rows(rows)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    check_locks()  # a run whose lock was removed may share its output with another: nothing is renamed then
    return finish_sink(sink, request.output)


def _lock_still_held(sink) -> None:
    """A run that fails or is stopped after its lock was removed under it (files.LockLost) says so, and only
    that: its journal is neither removed nor named as where its rows are (another run may be writing it)."""
    try:
        check_locks()
    except LockLost:
        if sink is not None:
            sink.close()
        raise


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


def close_on_error(sink, e: BaseException) -> None:
    """After an exception in a run: close the sink (its journal stays, for --resume); Ctrl-C and SIGTERM become
    errors.Interrupted, naming the journal. The caller re-raises anything else."""
    if sink is not None:
        sink.close()
    signum = signum_of(e)
    if signum is not None:
        journal = getattr(sink, "journal", None)
        raise Interrupted(signum, journal, f"rows so far are in {journal}; run the same command with --resume to "
                          "finish.") from None


def progress_bar(progress: bool, initial: int):
    """A bar on a terminal, a line every few seconds elsewhere (progress.py); None with --quiet. Its speed is
    named as the summary's (images/s, timm's word; failed files count, as in the summary), and it leaves none at
    the end: the summary's figure (this run's rows over its whole time) is the run's one speed figure."""
    if not progress:
        return None
    from fmnist_onnx.progress import bar

    return bar("classify", initial=initial, unit="images", dynamic_ncols=True, smoothing=0.1, rate_at_close=False)
