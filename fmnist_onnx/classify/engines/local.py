"""The local engine: worker processes on this machine turn chunks of paths into encoded rows.

Reading and decoding are most of the cost (threads would not help such small images: the decoders hold the
GIL), so worker processes do them, in chunks. Where the model runs comes from the provider table
(runtime.PROVIDER_TABLE):

- in the workers (the CPU): each worker also runs the model on its chunk, on one thread, and sends back the
  rows encoded as the sink writes them. The parent only walks, counts and writes: it is never the bottleneck.
- in a batched stage (CUDA, or ``inference="batched"``): the workers only decode, into shared memory (a slot
  of ``Slots``: uint8, 784 bytes an image); inference processes (one per 8 workers) run the model on whole
  chunks, with IO binding, and encode the rows. The parent passes a slot's number, never the pixels: pickling
  them through the parent cost it 3 us per file. The same code runs with the CPU provider, so CI tests it.

Either way the parent handles arrays and bytes per chunk, never a Python object per file. Chunks come back
in walk order. A worker that dies (a decoder crash, the OOM killer) costs its chunk a retry, file by file,
so that only the culprit gets an error row. Workers die with their parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing.util import Finalize

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.classify import sources
from fmnist_onnx.classify.contract import (
    CHUNK_BYTES,
    CRASHED,
    DEFAULT_BATCH,
    INFERENCE_MODES,
    Members,
    Request,
    Rows,
    part,
    truth_of,
    units_of,
)
from fmnist_onnx.classify.predict import decoder_name, make_rows, rows_of
from fmnist_onnx.errors import UserError
from fmnist_onnx.spec import IMAGE_SIZE
from fmnist_onnx.table import Row
from fmnist_onnx.testing import crash_point
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)

PIPED_BYTES = 8 << 20  # a chunk carrying this many member bytes sends them through a pipe (_Piped), not pickled
STAGE_DEPTH = 2  # chunks queued per inference process: it never waits for the parent, nor holds much memory
# Decoding workers per inference process. On the H100 with 16 workers, 1, 2 and 4 inference processes ran at
# 188k, 214k and 207k images/s (600,000 PNGs, best of two).
WORKERS_PER_STAGE = 8


def default_workers() -> int:
    """One decoding process per core this process may run on."""
    from fmnist_onnx.machine import usable_cores

    return usable_cores()


class Slots:
    """Memory that the parent, its decoding workers and the inference processes all share: an anonymous
    MAP_SHARED mapping made before they are forked, cut into slots of ``capacity`` images. A worker decodes a
    chunk into a free slot, the parent passes the slot's number on, an inference process reads it; the slot
    is free again once that chunk's rows are back. Only where processes are forked (Linux)."""

    def __init__(self, count: int, capacity: int) -> None:
        self.capacity = capacity
        self.bytes = capacity * IMAGE_SIZE * IMAGE_SIZE
        self.memory = mmap.mmap(-1, count * self.bytes)  # pages are only allocated once written
        self.free = list(range(count))

    def view(self, slot: int, n: int) -> np.ndarray:
        if n > self.capacity:
            raise ValueError(f"a chunk of {n} images in a slot of {self.capacity}")
        return np.frombuffer(self.memory, np.uint8, n * IMAGE_SIZE * IMAGE_SIZE,
                             slot * self.bytes).reshape(n, IMAGE_SIZE, IMAGE_SIZE)

    def close(self) -> None:
        try:
            self.memory.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


def _queue_fds(executor: ProcessPoolExecutor | None) -> list[int]:
    """The pipes of an executor's queues (attributes of concurrent.futures that have not changed since 3.8;
    none found, none closed). A process forked later inherits them, and while it holds the reading end of the
    executor's call queue, a worker's death can leave the parent's feeder thread writing into it forever
    (CPython unblocks it by closing the parent's own reading end: gh-94777)."""
    fds = []
    for queue in (getattr(executor, "_call_queue", None), getattr(executor, "_result_queue", None)):
        for end in (getattr(queue, "_reader", None), getattr(queue, "_writer", None)):
            try:
                fds.append(end.fileno())
            except (AttributeError, OSError):
                pass
    return fds


def _worker_init(parent: int | None = None, slots: Slots | None = None, foreign: Sequence[int] = ()) -> None:
    global _reader
    _reader = _Reader(slots)
    Finalize(_reader, _reader.close, exitpriority=0)  # as the process ends, on shutdown
    if foreign:  # the other executor's pipes, inherited through fork: /dev/null in their place (see _queue_fds)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in foreign:
            try:
                os.dup2(null, fd)  # not closed: the fd number stays taken, so no later close hits another file
            except OSError:
                pass
        os.close(null)
    # Ctrl-C goes to the whole process group: the parent handles it, workers finish their chunk quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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


# ---------------------------------------------------------------------------------------------- in a worker

@dataclass(frozen=True)
class _Job:
    """What a worker needs of the request (sent with every chunk: small)."""

    model: str
    invert: str
    top_k: int
    batch_size: int | None  # None: DEFAULT_BATCH in the workers, the whole chunk in the batched stage
    provider: str  # a name in runtime.PROVIDER_TABLE
    batched: bool  # the model runs in the batched stage (else in the decoding workers)


class _Reader:
    """What a worker or an inference process keeps from one chunk to the next, built by its pool's initializer
    (``_reader``): the engine's Slots (inherited through fork), its onnxruntime sessions, the true class of each
    folder met (predict.true_classes) and the sources' readers (sources.Readers). It lives as long as the
    process, and is closed as the process ends (the pool's shutdown)."""

    def __init__(self, slots: Slots | None) -> None:
        self.slots = slots
        self.sessions: dict[tuple[str, str], object] = {}  # (model, provider) -> its session
        self.known: dict[str, int] = {}  # folder -> true class
        self.sources = sources.Readers()

    def session(self, model: str, provider: str):
        """This process's session, on one intra-op thread: in a decoding worker, the other workers keep the
        other cores busy, and onnxruntime's spinning threads would only take CPU time from them (measured: 14 us
        of CPU per image on one thread, 23 on two); in an inference process on a GPU, the CPU has nothing to
        compute."""
        key = (model, provider)
        if key not in self.sessions:
            from fmnist_onnx.runtime import open_session

            self.sessions[key] = open_session(model, provider, threads=1)
        return self.sessions[key]

    def close(self) -> None:
        self.sources.close()


_reader: _Reader | None = None  # in a worker or inference process: the one its pool's initializer built


def _check_model(model: str, provider: str) -> None:
    _reader.session(model, provider)  # a UserError (bad model, provider missing) comes back to the parent as it is


def _stage_init(parent: int, slots: Slots | None, foreign: Sequence[int], model: str, provider: str) -> None:
    """An inference process: its session is opened as it starts (CUDA's start takes a while: every inference
    process does it at once). A failure is left for _check_model to report, in one line."""
    _worker_init(parent, slots, foreign)
    try:
        _reader.session(model, provider)
    except Exception:  # noqa: BLE001 - reported by _check_model, which meets it again
        pass


@dataclass(frozen=True)
class _Piped(Members):
    """A chunk whose members' bytes come through a pipe of their own (``pipe``, in order, where ``keys`` holds
    None), not pickled with it: the executor's pickling would hold each byte twice in the parent (the chunk,
    its pickle) and twice in the worker (the pickle read, the bytes loaded), 1 GB for a 250 MB member. Here
    the parent's thread writes the bytes it holds and the worker reads each straight into its own."""

    pipe: object = None  # the reading end of a multiprocessing Pipe (sent to the worker as a file descriptor)

    def received(self) -> Members:
        """The chunk with its bytes read from the pipe (in the worker)."""
        with self.pipe:
            keys = [self.pipe.recv_bytes() if k is None else k for k in self.keys]
        return Members(self.kind, self.container, self.units, keys, self.truth, self.sizes, True, self.column)


def _pour(conn, data: list[bytes]) -> None:
    """A thread of the parent: ``data`` into the pipe of a _Piped chunk, for its worker."""
    try:
        for d in data:
            conn.send_bytes(d)
    except OSError:  # the worker died, or the chunk was dropped: nobody reads
        pass
    finally:
        conn.close()


def _decode(item: Sequence[str] | Members, invert: str) -> tuple[np.ndarray, list[str], float]:
    """A chunk of loose files (paths: read here) or of a container's images (read by their source)."""
    crash_point(units_of(item))  # tests kill the worker here, on a file they name (testing.py)
    t0 = time.perf_counter()
    if isinstance(item, _Piped):
        item = item.received()
    if isinstance(item, Members):  # one member's bytes held at a time
        imgs, errors = images.preprocess_batch(_reader.sources.read(item), invert, len(item))
    else:
        imgs, errors = images.preprocess_batch(item, invert)
    return imgs, errors, time.perf_counter() - t0


def _classify_decoded(item: Sequence[str] | Members, imgs: np.ndarray, errors: list[str], seconds: float,
                      job: _Job, encoding: str) -> Rows:
    """The model on a decoded chunk: in a decoding worker (batches of DEFAULT_BATCH), or in the batched stage
    (the whole chunk in one call, with IO binding). The paths stay in the parent, which has them."""
    paths = units_of(item)
    batch = job.batch_size or (max(1, len(paths)) if job.batched else DEFAULT_BATCH)
    session = None if all(errors) else _reader.session(job.model, job.provider)
    rows = make_rows(session, paths, imgs, errors, job.top_k, batch, encoding, io_binding=job.batched,
                     truth=truth_of(item), known=_reader.known)
    rows.seconds, rows.paths = seconds, None
    return rows


def _decode_into(item: Sequence[str] | Members, invert: str, slot: int) -> tuple[list[str], float]:
    """A worker's job on the batched path: decode the chunk into its slot of shared memory."""
    imgs, errors, seconds = _decode(item, invert)
    _reader.slots.view(slot, len(imgs))[:] = imgs
    return errors, seconds


def _classify_slot(item: Sequence[str] | Members, slot: int, errors: list[str], seconds: float, job: _Job,
                   encoding: str) -> Rows:
    """An inference process's job: the model on the chunk decoded into ``slot``."""
    return _classify_decoded(item, _reader.slots.view(slot, len(errors)), errors, seconds, job, encoding)


def _decode_and_classify(item: Sequence[str] | Members, job: _Job, encoding: str) -> Rows:
    """A worker's whole job on the CPU: decode the chunk, run the model on one thread, encode the rows."""
    return _classify_decoded(item, *_decode(item, job.invert), job, encoding)


# ---------------------------------------------------------------------------------------------- the engine

def _piped(ctx, item: list[str] | Members) -> list[str] | Members:
    """A chunk that carries PIPED_BYTES or more, as a _Piped one (its bytes poured by a thread of ours as its
    worker reads them, through a pipe of ``ctx``, the pools' multiprocessing context); another as it is."""
    if not isinstance(item, Members) or _carried(item) < PIPED_BYTES:
        return item
    read, write = ctx.Pipe(duplex=False)
    threading.Thread(target=_pour, args=(write, [k for k in item.keys if isinstance(k, bytes)]),
                     name="fmnist-onnx-pour", daemon=True).start()
    keys = [None if isinstance(k, bytes) else k for k in item.keys]
    return _Piped(item.kind, item.container, item.units, keys, item.truth, item.sizes, True, item.column, read)


def _carried(item: list[str] | Members) -> int:
    """The member bytes a chunk carries to its worker (pickled with it)."""
    return item.carried() if isinstance(item, Members) else 0


def _failed(e: BaseException) -> Future:
    """A future that raises ``e`` where its result is collected."""
    fut: Future = Future()
    fut.set_exception(e)
    return fut


def _stage_result(fut: Future, written: bool):
    """A result of the inference processes; one line where one of them died. ``written``: rows were written
    before (the journal keeps them for --resume)."""
    try:
        return fut.result()
    except BrokenProcessPool:
        kept = "; the rows so far are kept: run the same command with --resume" if written else ""
        raise UserError(f"an inference process died (out of memory, or a crash in onnxruntime){kept}") from None


class _Processes:
    """The engine's processes: decoding workers, in a pool started again when one of them dies, never hanging;
    and for the batched stage, inference processes that run the model, with the Slots they all share. All
    forked before this process starts any thread (onnxruntime's pool, CUDA): by ``open``; ``close`` stops them."""

    def __init__(self, job: _Job, workers: int, stages: int, slots: int, capacity: int) -> None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"  # fork: milliseconds
        self.ctx = multiprocessing.get_context(method)
        self.job, self.workers, self.stages = job, workers, stages
        # fork only: spawned processes would not share the mapping (they get the pixels pickled instead). Pages
        # are only used as slots are: the chunks in flight, 6.4 MB each at most.
        self.slots = Slots(slots, capacity) if slots and method == "fork" else None
        self.pool: ProcessPoolExecutor | None = None
        self.stage: ProcessPoolExecutor | None = None
        self.ready: Future | None = None  # the model checked in a process that runs it

    def open(self) -> None:
        """Start the processes. The model is checked in a process that will run it, before any row is written:
        one clear line if it is bad. The inference processes are waited for at the first row (the engine's
        rows), decoding meanwhile."""
        self._start_pool()
        if self.job.batched:
            self.stage = ProcessPoolExecutor(
                self.stages, mp_context=self.ctx, initializer=_stage_init,
                initargs=(os.getpid(), self.slots, self._foreign(self.pool), self.job.model, self.job.provider))
        self.ready = (self.stage or self.pool).submit(_check_model, self.job.model, self.job.provider)
        if not self.job.batched:
            self.ready.result()

    def _foreign(self, executor: ProcessPoolExecutor | None) -> list[int]:
        """The pipes of ``executor`` that processes forked now inherit (spawned ones inherit none)."""
        return _queue_fds(executor) if self.ctx.get_start_method() == "fork" else []

    def _start_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=self.ctx, initializer=_worker_init,
                                        initargs=(os.getpid(), self.slots, self._foreign(self.stage)))
        self.pool.submit(os.getpid).result()  # all workers exist from here on

    def submit(self, paths: list[str], encoding: str, slot: int | None) -> Future:
        """A future of the chunk's Rows (the workers' path), or of its decoding (the batched path: errors and
        seconds, the images in ``slot``; or without slots, the images too); one that raises BrokenProcessPool
        if the pool is broken already (found out where results are collected)."""
        paths = _piped(self.ctx, paths)
        try:
            if slot is not None:
                return self.pool.submit(_decode_into, paths, self.job.invert, slot)
            if self.job.batched:
                return self.pool.submit(_decode, paths, self.job.invert)
            return self.pool.submit(_decode_and_classify, paths, self.job, encoding)
        except BrokenProcessPool as e:
            return _failed(e)

    def stage_submit(self, paths: list[str], encoding: str, slot: int | None, res: tuple) -> Future:
        """A future of the chunk's Rows from the inference processes (one that raises BrokenProcessPool if they
        are broken already: found out where results are collected)."""
        if isinstance(paths, Members) and paths.inline:  # the stage needs the names, not the bytes again
            paths = replace(paths, keys=(), sizes=(), inline=False)
        try:
            if slot is None:
                return self.stage.submit(_classify_decoded, paths, *res, self.job, encoding)
            return self.stage.submit(_classify_slot, paths, slot, *res, self.job, encoding)
        except BrokenProcessPool as e:
            return _failed(e)

    def redo(self, paths: list[str], slot: int | None, encoding: str, decoding: deque):
        """A worker died (the OOM killer, a decoder crash), and every chunk in flight in its pool failed with it,
        this one perhaps as a bystander: a new pool, this chunk tried again alone, and if a worker dies on it
        again, file by file (a file that kills its worker gets an error row); only then the chunks in flight
        submitted again, each of which, should it fail, comes here in its turn."""
        log.warning("a worker process died; trying its chunks again")
        self._start_pool()
        try:
            res = self.submit(paths, encoding, slot).result()
        except BrokenProcessPool:
            log.warning("a worker process died on the same chunk; decoding it file by file")
            self._start_pool()
            res = self._isolate(paths)
            if slot is not None:  # the isolated images go where the chunk's worker would have put them
                self.slots.view(slot, len(paths))[:] = res[0]
                res = res[1:]
            if not self.job.batched:  # the workers' path: classify here what was decoded there
                res = self.pool.submit(_classify_decoded, paths, *res, self.job, encoding).result()
        decoding = deque((p, self.submit(p, encoding, s) if p is not None else f, s) for p, f, s in decoding)
        return res, decoding

    def _isolate(self, item: list[str] | Members) -> tuple[np.ndarray, list[str], float]:
        """Decode a chunk that was in a dying pool file by file, each alone in the pool, so that a file that
        kills its worker is named and the others are decoded."""
        out = np.zeros((len(item), images.IMAGE_SIZE, images.IMAGE_SIZE), dtype=np.uint8)
        errors = [""] * len(item)
        for i, path in enumerate(units_of(item)):
            try:
                one = _piped(self.ctx, part(item, i, i + 1))
                imgs, errs, _ = self.pool.submit(_decode, one, self.job.invert).result()
                out[i], errors[i] = imgs[0], errs[0]
            except BrokenProcessPool:
                log.warning("%s: %s", visible(path), CRASHED)
                errors[i] = CRASHED
                self._start_pool()
        return out, errors, 0.0

    def close(self) -> None:
        """Stop every process and free the slots; again, nothing. Never raises: it runs on the way out of
        a run, whatever ended it."""
        for ex in (self.pool, self.stage):
            if ex is not None:
                try:
                    ex.shutdown(wait=True, cancel_futures=True)
                except Exception as e:  # noqa: BLE001 - the error that ended the run is the one to tell
                    log.debug("stopping the processes: %s", e)
        self.pool = self.stage = None
        if self.slots is not None:
            self.slots.close()
            self.slots = None


class LocalEngine:
    """Worker processes on this machine (``_Processes``) turning the walk's chunks into Rows, in walk order
    (contract.Engine). Made from the request, its options checked, no process started: ``with`` (``open``)
    starts them, its end (``close``) stops them."""

    def __init__(self, request: Request, workers: int | None = None, inference: str = "auto",
                 stages: int | None = None) -> None:
        from fmnist_onnx.classify import contract  # its caps read at each run: benchmarks/gpu.sh sets them
        from fmnist_onnx.runtime import PROVIDER_TABLE, classify_provider

        # cheap: no session, no CUDA initialisation here
        self.provider, self.provider_reason = classify_provider(request.provider)
        if inference not in INFERENCE_MODES:
            raise UserError(f"--inference must be one of {', '.join(INFERENCE_MODES)}")
        in_workers = PROVIDER_TABLE[self.provider].model_in_workers if inference == "auto" else inference == "workers"
        if in_workers and self.provider != "cpu":
            raise UserError(f"--inference workers runs the model in the decoding processes, on the CPU only; "
                            f"--provider {self.provider} runs it in the batched stage")
        self.batched = not in_workers
        self.job = _Job(request.model, request.invert, request.top_k, request.batch_size, self.provider, self.batched)
        self.workers = workers or default_workers()
        self.stages = (stages or max(1, self.workers // WORKERS_PER_STAGE)) if self.batched else 0
        self.depth = 2 * self.workers + 1  # chunks being decoded: workers never wait for the parent
        self.stage_depth = STAGE_DEPTH * self.stages
        # While the inference processes start (CUDA takes a second or more), the workers decode on into
        # this many more slots: at most 4 chunks a worker.
        self.startup_depth = 4 * self.workers if self.batched else 0
        self.decoder = decoder_name() + (", then a batched inference stage" if self.batched else "")
        self.max_chunk = contract.BATCHED_MAX_CHUNK if self.batched else contract.MAX_CHUNK
        self.procs: _Processes | None = None

    def open(self) -> LocalEngine:
        """Start the processes (a UserError for a bad model: it is checked there); once only."""
        if self.procs is None:
            slots = self.depth + self.stage_depth + self.startup_depth if self.batched else 0
            self.procs = _Processes(self.job, self.workers, self.stages, slots, self.max_chunk)
            try:
                self.procs.open()
            except BaseException:
                self.close()
                raise
        return self

    def close(self) -> None:
        """Stop the processes; again, nothing. Never raises."""
        if self.procs is not None:
            self.procs.close()
            self.procs = None

    def __enter__(self) -> LocalEngine:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def rows(self, items: Iterator[list[str] | Members | Row], encoding: str,
             observe: Callable[[float, int], None]) -> Iterator[Rows]:
        """Rows for each work item (a chunk of paths, or a row known already), in walk order."""
        procs, slots = self.procs, self.procs.slots
        decoding: deque = deque()  # (paths, future, slot) or (None, Row, None), in walk order
        staged: deque = deque()  # (paths, future of Rows, slot) in the inference stage, in walk order
        written = False  # rows went to the sink already
        carried = 0  # member bytes the chunks in flight carry: CHUNK_BYTES at most, or one chunk's

        def feed() -> None:
            nonlocal carried
            while len(decoding) < self.depth and (carried < CHUNK_BYTES or not (decoding or staged)):
                if (item := next(items, None)) is None:
                    return
                if isinstance(item, Row):
                    decoding.append((None, item, None))
                else:
                    carried += _carried(item)
                    slot = slots.free.pop() if slots is not None else None
                    decoding.append((item, procs.submit(item, encoding, slot), slot))

        feed()
        while decoding or staged:
            # the stage's oldest chunk: when the stage is full (more may wait as it starts), or nothing is before it
            limit = self.stage_depth + (0 if procs.ready.done() else self.startup_depth)
            if staged and (len(staged) >= limit or not decoding or decoding[0][0] is None):
                paths, fut, slot = staged.popleft()
                _stage_result(procs.ready, written)  # a bad model: its one line, before any row
                rows = _stage_result(fut, written)
                if slot is not None:
                    slots.free.append(slot)
                rows.paths, carried = units_of(paths), carried - _carried(paths)
                del paths  # its bytes, if it carries any, go before the walk reads on
                feed()
                written = True
                yield rows
                continue
            paths, fut, slot = decoding.popleft()
            if paths is None:  # a row known already (a folder that cannot be listed)
                _stage_result(procs.ready, written)
                written = True
                yield rows_of([fut], encoding, self.job.top_k)
                continue
            try:
                res = fut.result()
            except BrokenProcessPool:
                res, decoding = procs.redo(paths, slot, encoding, decoding)
            observe(res.seconds if isinstance(res, Rows) else res[-1], len(paths))
            if isinstance(res, Rows):
                res.paths, carried = units_of(paths), carried - _carried(paths)
            else:
                staged.append((paths, procs.stage_submit(paths, encoding, slot, res), slot))
            del paths  # its bytes, if it carries any and is done, go before the walk reads on
            feed()  # keep the workers busy while this chunk is written
            if isinstance(res, Rows):
                written = True
                yield res
