"""classify on a Ray cluster (``classify --engine ray``): the local engine's rows, made by a pool of Ray actors.

The driver (this process) walks the inputs through the sources (sources/folder.py; sources/uri.py, pyarrow's
file systems, for URIs such as s3://bucket/photos/; tar, zip and Parquet containers, as ``Members``) in the
pipeline's chunks, and sends each chunk, as it comes, to one of a pool of actors, each with one onnxruntime
session. An actor does what a local worker does (engines/local.py): reads the chunk's files or a container's
members, decodes them, runs the model and encodes the rows as the sink writes them (predict.make_rows); it sends
back the encoded bytes and int16 arrays (contract.Rows), so the driver does no work per file: it writes them
through the same journaled sinks (CSV, JSONL, Parquet) and counts them with the same Tally. So: exactly one row
per file, the same columns, scores and summary, errors as rows, --resume, and the same exit codes.

Why actors of our own, not Ray Data (map_batches over from_arrow, as this engine was first written): on 2
cores Ray Data's import (1.4 s in the driver, more in each worker), its planning and per-block scheduling, and
rows passing through the driver as Arrow, then Python objects, made it 0.64x the local engine's steady state
and 9 s of fixed cost (benchmarks/classify_ray.py). The pool is small: chunks go to the least busy actor, two
per actor in flight (one running, one queued, so that an actor never waits for the driver), and come back
with ray.wait in the order they are done.

Why the actors read the files, not ray.data.read_binary_files or read_images: a file that Ray's reader cannot
open (a dangling link, no permission, deleted meanwhile) fails its read task or, with ignore_missing_paths,
silently disappears; either way its row is lost.

A chunk whose actor died (a file that crashes the decoder, the OOM killer) is tried again on a new actor, then
its files one by one, one at a time per actor, so that only the culprit gets an error row (CRASHED), as in the
local engine. Rows are written in the order they are done, not in walk order (the local engine's order). It is
for clusters, and never picked by default.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from fmnist_onnx import TELEMETRY_ENV, images
from fmnist_onnx.classify import sources
from fmnist_onnx.classify.contract import (
    CHUNK_BYTES,
    CRASHED,
    DEFAULT_BATCH,
    MAX_CHUNK,
    Members,
    Request,
    Rows,
    part,
    truth_of,
    units_of,
)
from fmnist_onnx.classify.engines import ENGINES
from fmnist_onnx.classify.predict import decoder_name, make_rows, rows_of
from fmnist_onnx.classify.sources import is_uri
from fmnist_onnx.classify.sources.uri import _uri_fs, read_uri
from fmnist_onnx.errors import UserError
from fmnist_onnx.table import Row
from fmnist_onnx.testing import crash_env, crash_point
from fmnist_onnx.text import first_line, visible

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2  # chunks queued on an actor: one running, the next waiting (the actor never idles)
MIN_RESERVE_CPU = 0.5  # CPUs no actor claims (ray-project/ray#44687: Ray Data hung when actors claimed them all)
RESERVE_CPU_SHARE = 0.05
TASK_RETRIES = 2  # tries of a chunk after its actor died, before its files are tried one by one
INSTALL_HINT = ENGINES["ray"].install


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise UserError(f"--engine ray needs Ray ({e}): {INSTALL_HINT}") from None
    return ray


# ---------------------------------------------------------------------------------------------- the actors


class Predictor:
    """One Ray actor: an onnxruntime session, what it keeps between chunks (file systems, the true class of each
    folder met, the sources' readers), and a call that turns a chunk of work (paths, or a container's Members)
    into encoded Rows, as a local worker does.

    An exception here would only kill the actor, which the driver would take for a crash and retry; instead
    it goes back to the driver as (a UserError's exit code, or 0 for a bug; message), and the driver stops the
    run with its message (a UserError, such as CUDA missing on this node, stays one clear line)."""

    def __init__(self, model: bytes, provider: str, invert: str, top_k: int, batch_size: int) -> None:
        self.fatal: tuple[int, str] | None = None
        self.invert, self.top_k, self.batch_size = invert, top_k, batch_size
        self.filesystems: dict[str, object] = {}
        self.known: dict[str, int] = {}  # folder -> true class (predict.true_classes)
        self.sources = sources.Readers()  # what the sources keep between chunks
        try:
            from fmnist_onnx.runtime import open_session

            # The model travels as bytes (the driver's file may not exist on this node); onnxruntime wants a file.
            with tempfile.TemporaryDirectory(prefix="fmnist-onnx-") as tmp:
                path = Path(tmp) / "model.onnx"
                path.write_bytes(model)
                # one intra-op thread on CPUs, as in the local engine: the other actors use the other cores
                self.session = open_session(path, provider, threads=1 if provider == "cpu" else None)
        except Exception as e:  # noqa: BLE001 - see the class doc
            self.fatal = _fatal(e)

    def _read(self, uri: str) -> bytes:
        """A URI's bytes, through one file system per 'scheme://authority', made once per actor."""
        scheme, _, rest = uri.partition("://")
        key = f"{scheme}://{rest.split('/', 1)[0]}/"  # the authority alone: a file's name may not parse as a URI
        if key not in self.filesystems:
            self.filesystems[key] = _uri_fs(key)[0]
        return read_uri(self.filesystems[key], rest)

    def _data(self, paths: list[str]) -> list:
        """What preprocess_batch reads: a local path as it is (images.read_file), a URI's bytes or its error."""
        data: list = list(paths)
        for i, path in enumerate(paths):
            if is_uri(path):
                try:
                    data[i] = self._read(path)
                except (images.ImageError, UserError) as e:
                    data[i] = images.ImageError(str(e))
        return data

    def classify(self, item: list[str] | Members, encoding: str) -> Rows | tuple[int, str]:
        """The chunk's Rows (without their paths: the driver has them), or the fatal error."""
        if self.fatal is not None:
            return self.fatal
        crash_point(units_of(item))  # tests kill the actor here, on a file they name (testing.py)
        try:
            t0 = time.perf_counter()
            data = self.sources.read(item) if isinstance(item, Members) else self._data(item)
            imgs, errors = images.preprocess_batch(data, self.invert, len(item))  # one member held at a time
            seconds = time.perf_counter() - t0
            session = None if all(errors) else self.session
            rows = make_rows(session, units_of(item), imgs, errors, self.top_k, self.batch_size, encoding,
                             truth=truth_of(item), known=self.known)
        except Exception as e:  # noqa: BLE001 - see the class doc
            return _fatal(e)
        rows.seconds, rows.paths = seconds, None
        return rows


def _fatal(e: BaseException) -> tuple[int, str]:
    """An actor's exception as (a UserError's exit code, or 0; message) for the driver; a bug keeps its
    traceback."""
    import socket
    import traceback

    if isinstance(e, UserError):
        return e.exit_code, str(e)
    return 0, f"on {socket.gethostname()}: " + "".join(traceback.format_exception(e)).strip()


def _raise_fatal(code: int, message: str) -> None:
    """An actor's fatal error, raised in the driver as the actor met it: a ModelRunError keeps its kind (the
    run says where the rows are kept), another UserError its exit code."""
    from fmnist_onnx.runtime import MODEL_FAILED, ModelRunError

    if code == MODEL_FAILED:
        raise ModelRunError(message)
    if code:
        raise UserError(message, exit_code=code)
    raise RuntimeError(f"a Ray actor failed {message}")


# ---------------------------------------------------------------------------------------------- the pool

def plan_pool(resources: dict[str, float], provider: str, actors: int | None,
              local_cuda: bool | None = None) -> tuple[str, int, float, float]:
    """(provider, actors, CPUs per actor, GPUs per actor) for a cluster with ``resources``.

    CPU actors: one per CPU by default, together claiming all but max(0.5, 5%) of the CPUs (fractions where
    needed: processes still share the cores, but the cluster keeps a slot for other tasks: Ray Data, which a
    user's own pipeline may run beside, hangs without one). GPU actors: one per GPU by default; --actors
    beyond the GPUs share them (fractional GPUs), which adds decoding processes.
    ``local_cuda``: for a runtime started here, whether this machine's onnxruntime has CUDA (None: remote)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if provider == "auto":
        provider = "cuda" if gpus >= 1 and local_cuda is not False else "cpu"
    if provider == "cuda" and gpus < 1:
        raise UserError("--provider cuda: the Ray cluster has no GPU (resources: "
                        f"{cpus:g} CPU, {gpus:g} GPU); use --provider cpu")
    free = cpus - max(MIN_RESERVE_CPU, RESERVE_CPU_SHARE * cpus)
    if free <= 0:
        raise UserError(f"the Ray cluster has {cpus:g} CPU: too few for actors (some are left for other tasks)")
    if provider == "cuda":
        n = actors or int(gpus)
        per_gpu = min(1.0, math.floor(100 * gpus / n) / 100)
        if per_gpu <= 0:
            raise UserError(f"--actors {n}: too many for {gpus:g} GPU (at most {int(100 * gpus)})")
    else:
        n = actors or max(1, int(cpus))
        per_gpu = 0.0
    per_cpu = min(1.0, math.floor(1000 * free / n) / 1000)
    if per_cpu <= 0:
        raise UserError(f"--actors {n}: too many for {cpus:g} CPU")
    return provider, n, per_cpu, per_gpu


class _Pool:
    """The actors, and the chunks in flight on them. An actor that died is replaced at once; the chunks that
    were on it come back from ``next`` with no result, for the caller to try again."""

    def __init__(self, ray, n: int, options: dict, args: tuple) -> None:
        self.ray = ray
        self.cls = ray.remote(Predictor).options(max_restarts=0, max_task_retries=0, **options)
        self.args = args
        self.actors = [self.cls.remote(*args) for _ in range(n)]  # they start while the driver walks
        self.load = [0] * n  # chunks in flight per actor
        self.pending: dict = {}  # ObjectRef -> (item, actor index, actor, tries)
        self.carried = 0  # member bytes the chunks in flight carry (a compressed tar's: contract.CHUNK_BYTES)

    def __len__(self) -> int:
        return len(self.pending)

    def submit(self, item: list[str] | Members, encoding: str, tries: int = 0) -> None:
        """To the least busy actor (with one chunk per actor at most in flight, an idle one)."""
        i = min(range(len(self.actors)), key=self.load.__getitem__)
        self.pending[self.actors[i].classify.remote(item, encoding)] = (item, i, self.actors[i], tries)
        self.load[i] += 1
        self.carried += item.carried() if isinstance(item, Members) else 0

    def next(self) -> tuple[list[str] | Members, int, Rows | tuple[int, str] | None]:
        """The first chunk done: (item, tries so far, its Rows or fatal error; None where its actor died)."""
        ray = self.ray
        (ref,), _ = ray.wait(list(self.pending), num_returns=1)
        item, i, actor, tries = self.pending.pop(ref)
        self.load[i] -= 1
        self.carried -= item.carried() if isinstance(item, Members) else 0
        try:
            return item, tries, ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
            if self.actors[i] is actor:  # not replaced yet (another chunk on it may have been first to tell)
                self.actors[i] = self.cls.remote(*self.args)
            return item, tries, None

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception as e:  # noqa: BLE001 - one that cannot be killed does not spare the others
                log.debug("killing a Ray actor: %s", e)
        self.actors, self.pending, self.carried = [], {}, 0


def _one_by_one(item: list[str] | Members) -> Iterator[list[str] | Members]:
    for i in range(len(item)):
        yield part(item, i, i + 1)


def _crashed(item: list[str] | Members, encoding: str, top_k: int) -> Rows:
    """The error row of a file whose actor died on every try."""
    row = Row(units_of(item)[0], error=CRASHED)
    log.warning("%s: %s", visible(row.path), row.error)
    return rows_of([row], encoding, top_k, truth_of(item))


# ---------------------------------------------------------------------------------------------- the driver

def _verbose() -> bool:
    return logging.getLogger().isEnabledFor(logging.INFO)


@contextlib.contextmanager
def _quiet_backend(quiet: bool):
    """Ray's C++ side (the driver's core worker) writes its errors to stderr itself, and an actor pool whose
    actors restart with constructor arguments in the object store makes it write one on a successful run:
    "has constructor arguments in the object store and max_restarts > 0" (ray-project/ray#57733). Only the
    level read from RAY_BACKEND_LOG_LEVEL when the core worker starts (in ray.init) can stop it: "fatal", unless
    the user chose a level. Setting it makes Ray log one line saying so, there and then: file descriptor 2 goes
    to /dev/null for ray.init's time (a failed init is an exception: its one line is ours). A local runtime
    started here inherits the level: its log files hold fatal errors only."""
    if not quiet or "RAY_BACKEND_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        del os.environ["RAY_BACKEND_LOG_LEVEL"]


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a HOST:PORT address (None where something does, or for another form): ray.init
    would retry for minutes, and with its C++ warnings off (_quiet_backend) it would do so in silence."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def _connect(ray, address: str | None) -> bool:
    """Connect to ``address`` (else $RAY_ADDRESS, else a new local runtime). True if this call connected (then
    the caller disconnects, which stops a local runtime); False if Ray was connected already (a caller's own
    runtime: used, and left as it was)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    verbose = _verbose()
    # Quiet unless -v: Ray's warnings about its own defaults (token auth, deprecations) and the actors' logs
    # would bury the summary; errors still come through, as exceptions.
    kwargs: dict = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address == "local":
        kwargs["include_dashboard"] = False
    elif why := _unreachable(address):
        raise UserError(f"cannot connect to the Ray cluster at {address}: {why}")
    try:
        with _quiet_backend(not verbose):
            ray.init(address=address, **kwargs)
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, AuthenticationError, ...: all one line
        hint = ""
        if address != "local" and os.environ.get("RAY_AUTH_MODE") != "token":
            # Ray connects to an explicit address without its token unless told to
            hint = " (if the cluster uses token authentication, set RAY_AUTH_MODE=token)"
        raise UserError(f"cannot connect to the Ray cluster at {address}: {first_line(e)}{hint}") from None
    return True


def _errors_to_log() -> Callable[[], None] | None:
    """Send the cluster's error messages that Ray's driver prints to the log (-v shows them, on stderr), not to
    stdout; returns the undo (None where this Ray has no such printer).

    Why: a thread of the driver (listen_error_messages, ray/_private/worker.py) prints them on stdout, whatever
    log_to_driver says, such as "(raylet) A worker died or was killed while executing a task" when an actor
    dies: in the CSV that -o - writes, or before --json's summary, where they break what reads it. The engine
    meets those deaths itself (the chunk tried again, a CRASHED row, a warning). Only for a connection of this
    engine's own: a caller's runtime is left as it was. The thread looks the printer up at each message; it is
    stopped (joined) by ray.shutdown, after which the undo runs."""
    try:
        from ray._private import worker
        original = worker.print_to_stdstream
    except (ImportError, AttributeError):  # another Ray than the one this was written for: its own way
        return None

    def to_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("is_err") or data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        for line in data.get("lines", ()):
            log.info("Ray: %s", line)
        return None

    worker.print_to_stdstream = to_log
    return lambda: setattr(worker, "print_to_stdstream", original)


class RayEngine:
    """The pipeline's engine on Ray (contract.Engine): made from the request, its options and the model checked;
    ``with`` (``open``) connects (or starts a local runtime), plans and starts the actor pool, its end (``close``)
    stops them. It turns the walk's chunks into Rows, in the order they are done."""

    def __init__(self, request: Request, address: str | None = None, actors: int | None = None) -> None:
        if actors is not None and actors < 1:
            raise UserError("--actors must be at least 1")
        self.ray = _import_ray()
        from fmnist_onnx.runtime import open_session

        open_session(request.model, "cpu")  # a broken or wrong model is one clear error here, before any cluster work
        self.request, self.address, self.actors = request, address, actors
        self.pool: _Pool | None = None
        self.started, self.warnings, self.undo_errors = False, None, None
        self.decoder = f"{decoder_name()} in Ray actors"
        self.max_chunk = MAX_CHUNK

    def __enter__(self) -> RayEngine:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> RayEngine:
        """Connect and start the actors (they start while the driver walks); once only."""
        if self.pool is not None:
            return self
        from fmnist_onnx.runtime import PROVIDERS, available_providers, resolve_provider

        request, address = self.request, self.address
        if not _verbose():
            # Ray's warnings (an idle actor, a deprecation) are about Ray, not about this run; -v shows them. The
            # filter holds until close(): Ray may warn from its own threads.
            self.warnings = warnings.catch_warnings()
            self.warnings.__enter__()
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
        try:
            self.started = _connect(self.ray, address)
            self.undo_errors = _errors_to_log() if self.started else None
            local_runtime = self.started and not (address or os.environ.get("RAY_ADDRESS"))
            local_cuda = PROVIDERS["cuda"] in available_providers() if local_runtime else None
            if local_runtime and request.provider == "cuda" and not local_cuda:
                resolve_provider("cuda")  # the local engine's error: onnxruntime here has no CUDA
            self.provider, self.workers, per_cpu, per_gpu = plan_pool(self.ray.cluster_resources(), request.provider,
                                                                      self.actors, local_cuda)
            options = {"num_cpus": per_cpu, **({"num_gpus": per_gpu} if per_gpu else {})}
            # Actors on a cluster do not inherit the driver's environment. Importing this package turns onnxruntime's
            # telemetry off in them as here (fmnist_onnx/__init__.py); a user's own ORT_DISABLE_TELEMETRY=0 goes to
            # them in a runtime_env, as a test's crash point does. Only then: an actor with a runtime_env cannot
            # take a worker that Ray started ahead (ray-project/ray#47212), so it starts slower.
            env = crash_env()
            if os.environ.get(TELEMETRY_ENV, "1") != "1":
                env[TELEMETRY_ENV] = os.environ[TELEMETRY_ENV]
            if env:
                options["runtime_env"] = {"env_vars": env}
            args = (self.ray.put(Path(request.model).read_bytes()), self.provider, request.invert, request.top_k,
                    request.batch_size or DEFAULT_BATCH)
            self.pool = _Pool(self.ray, self.workers, options, args)
        except BaseException:
            self.close()
            raise
        log.info("Ray pool: %d actors, %g CPU and %g GPU each (%s)", self.workers, per_cpu, per_gpu, self.provider)
        return self

    def rows(self, items: Iterator[list[str] | Members | Row], encoding: str,
             observe: Callable[[float, int], None] | None = None) -> Iterator[Rows]:
        """Rows for the work items, in the order they are done: each chunk to the actors as it comes, at most
        IN_FLIGHT_PER_ACTOR per actor; then the files of chunks whose actor died on every try, one by one."""
        pool, lost = self.pool, []
        depth = IN_FLIGHT_PER_ACTOR * len(pool.actors)
        for item in items:
            if isinstance(item, Row):  # a folder that cannot be listed, a damaged archive: its row at once
                yield rows_of([item], encoding, self.request.top_k)
                continue
            if isinstance(item, Members):
                item, early = self._early(item, encoding)
                if early is not None:
                    yield early
            if len(item):
                pool.submit(item, encoding)
            # the walk reads on only once fewer chunks, and at most CHUNK_BYTES of their members, are in flight
            while len(pool) >= depth or (len(pool) and pool.carried >= CHUNK_BYTES):
                yield from self._collect(encoding, lost, observe)
        while len(pool):
            yield from self._collect(encoding, lost, observe)
        if lost:
            # Chunks whose actor died on every try (a file that crashes the decoder, or the OOM killer): again
            # file by file, one at a time per actor, so that a crash takes down its own file only.
            log.warning("%d files were in chunks whose actor died; trying them one by one",
                        sum(len(i) for i in lost))
            for one in (one for item in lost for one in _one_by_one(item)):
                pool.submit(one, encoding)
                while len(pool) >= len(pool.actors):
                    yield from self._collect(encoding, None, None)
            while len(pool):
                yield from self._collect(encoding, None, None)

    def _early(self, item: Members, encoding: str) -> tuple[Members, Rows | None]:
        """A container's images that its source could not give (a compressed tar's member too large): their
        rows at once, and the others."""
        early = [i for i, k in enumerate(item.keys) if isinstance(k, images.ImageError)]
        if not early:
            return item, None
        rows = rows_of([Row(item.units[i], error=str(item.keys[i])) for i in early], encoding, self.request.top_k,
                       [item.truth[i] for i in early])
        return item.keep([not isinstance(k, images.ImageError) for k in item.keys]), rows

    def _collect(self, encoding: str, lost: list | None, observe) -> Iterator[Rows]:
        """The next chunk done: its Rows; a chunk whose actor died goes again (``lost``, after TASK_RETRIES;
        None: a single file, which then gets its CRASHED row)."""
        item, tries, res = self.pool.next()
        if res is None:
            if tries < TASK_RETRIES:
                self.pool.submit(item, encoding, tries + 1)
            elif lost is not None:
                lost.append(item)
            else:
                yield _crashed(item, encoding, self.request.top_k)
            return
        if isinstance(res, tuple):
            _raise_fatal(*res)
        res.paths = units_of(item)
        if observe is not None:
            observe(res.seconds, len(res))
        yield res

    def close(self) -> None:
        """Stop the actors, and a runtime this engine started; again, nothing. Never raises: it runs on the way
        out of a run, whatever ended it."""
        steps = []
        if self.pool is not None:
            steps.append(self.pool.close)
        if self.started:
            steps.append(self.ray.shutdown)
        if self.undo_errors is not None:
            steps.append(self.undo_errors)
        if self.warnings is not None:
            steps.append(functools.partial(self.warnings.__exit__, None, None, None))
        self.pool, self.started, self.undo_errors, self.warnings = None, False, None, None
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - the error that ended the run is the one to tell
                log.debug("stopping Ray: %s", e)
