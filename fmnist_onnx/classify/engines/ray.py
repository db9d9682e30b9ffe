"""classify on Ray Data (``classify --engine ray``): the local engine's rows, made by a pool of actors on a cluster.

The driver (this process) walks the inputs through the sources (sources/folder.py; sources/uri.py, pyarrow's
file systems, for URIs such as s3://bucket/photos/) and gives Ray Data the list of paths, in blocks.
A pool of callable-class actors, each with one onnxruntime session, reads each block's files as bytes,
decodes and preprocesses them with the local engine's function (images.preprocess_batch) and makes the rows
with predict.predict_rows; the rows stream back to the driver, which writes them through the
same journaled sinks (CSV, JSONL, Parquet) and counts them with the same Tally. So: exactly one row per
file, the same columns, scores and summary, errors as rows, --resume, and the same exit codes.

Why the actors read the files, not ray.data.read_binary_files or read_images: a file that Ray's reader cannot
open (a dangling link, no permission, deleted meanwhile) fails its read task or, with ignore_missing_paths,
silently disappears; either way its row is lost. And read_images decoded at half the speed here.

Sizing: Ray Data hangs when actors claim every CPU (ray-project/ray#44687): the pool leaves
max(0.5, 5%) of the cluster's CPUs unclaimed, with fractional CPUs per actor where needed.

Rows are written in the order they are done, not in walk order (the local engine's order). On 2 local
cores this engine was 10-18x slower than the local one on 10,000 PNGs and 5-8x on 60,000 (the runtime's and
the actors' start-up, scheduling, the object store; benchmarks/classify_ray.py): it is for clusters, and
never picked by default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from fmnist_onnx import images
from fmnist_onnx.classify import sources
from fmnist_onnx.classify.contract import CRASHED, DEFAULT_BATCH, MAX_CHUNK, Members, Request, Rows
from fmnist_onnx.classify.engines import ENGINES
from fmnist_onnx.classify.predict import decoder_name, predict_rows, rows_of
from fmnist_onnx.classify.sources import is_uri
from fmnist_onnx.classify.sources.uri import _first_line, _uri_fs, read_uri
from fmnist_onnx.errors import UserError
from fmnist_onnx.sinks import Row
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)

MAX_BLOCK = 1024  # files per block (one actor call): tiny PNGs take ~50 ms a block
MIN_BLOCK = 16
BLOCKS_PER_ACTOR = 4  # at least: every actor gets work, and the last blocks finish close together
MIN_RESERVE_CPU = 0.5  # CPUs no actor claims, so that Ray Data's own tasks can run (ray-project/ray#44687)
RESERVE_CPU_SHARE = 0.05
TASK_RETRIES = 2  # tries of a block after its actor died, before its files are tried one by one
INSTALL_HINT = ENGINES["ray"].install


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra (pyarrow, pandas) must be there too
    except ImportError as e:
        raise UserError(f"--engine ray needs Ray Data ({e}): {INSTALL_HINT}") from None
    return ray


# ---------------------------------------------------------------------------------------------- inputs


# ---------------------------------------------------------------------------------------------- the actors


class Predictor:
    """One Ray actor: an onnxruntime session, and a call that turns a block of paths into rows.

    An exception here would only kill the actor, which Ray Data restarts (the constructor's) or retries
    (the call's) and then hides; instead it goes back to the driver in the ``fatal`` column, and the driver
    stops the run with its message (a UserError, such as CUDA missing on this node, stays one clear line)."""

    def __init__(self, model: list, provider: str, invert: str, top_k: int, batch_size: int) -> None:
        self.fatal: tuple[int, str] | None = None  # (a UserError's exit code, 0 for a bug; message)
        self.invert, self.top_k, self.batch_size = invert, top_k, batch_size
        self.filesystems: dict[str, object] = {}
        try:
            import ray

            from fmnist_onnx.runtime import open_session

            # The model travels as bytes (the driver's file may not exist on this node); onnxruntime wants a file.
            with tempfile.TemporaryDirectory(prefix="fmnist-onnx-") as tmp:
                path = Path(tmp) / "model.onnx"
                path.write_bytes(ray.get(model[0]))
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

    def __call__(self, batch):
        import pyarrow as pa

        rows, fatal = [], self.fatal
        if fatal is None:
            try:
                rows = self._rows(batch)
            except Exception as e:  # noqa: BLE001 - see the class doc
                fatal = _fatal(e)
        n = len(batch["id"])
        return pa.table({
            "id": batch["id"],
            "indices": pa.array([list(r.indices) for r in rows] or [[]] * n, pa.list_(pa.int64())),
            "scores": pa.array([list(r.scores) for r in rows] or [[]] * n, pa.list_(pa.float64())),
            "error": pa.array([r.error for r in rows] or [""] * n, pa.string()),
            "fatal": pa.array([fatal[1] if fatal else None] * n, pa.string()),
            "fatal_exit": pa.array([fatal[0] if fatal else 0] * n, pa.int64()),
        })

    def _rows(self, batch) -> list[Row]:
        paths = [os.fsdecode(p) for p in batch["path"].to_pylist()]
        data: list = list(paths)  # a local path: preprocess_batch reads it (images.read_file)
        for i, path in enumerate(paths):
            if is_uri(path):
                try:
                    data[i] = self._read(path)
                except (images.ImageError, UserError) as e:
                    data[i] = images.ImageError(str(e))
        for start, stop, members in _members_of(batch, paths):  # images inside containers: read by their source
            data[start:stop] = sources.read(members)
        imgs, errors = images.preprocess_batch(data, self.invert)
        return predict_rows(self.session, paths, imgs, errors, self.top_k, self.batch_size)


def _members_of(batch, paths: list[str]) -> Iterator[tuple[int, int, Members]]:
    """The block's runs of images from one container, as (start, stop, Members)."""
    kinds, containers = batch["kind"].to_pylist(), batch["container"].to_pylist()
    keys, sizes, inline = batch["key"].to_pylist(), batch["size"].to_pylist(), batch["inline"].to_pylist()
    i = 0
    while i < len(paths):
        if kinds[i] is None:
            i += 1
            continue
        j = i
        while j < len(paths) and kinds[j] == kinds[i] and containers[j] == containers[i]:
            j += 1
        carried = inline[i] is not None
        members = Members(kinds[i], os.fsdecode(containers[i]), paths[i:j], inline[i:j] if carried else keys[i:j],
                          [-1] * (j - i), () if sizes[i] < 0 else sizes[i:j], carried)
        yield i, j, members
        i = j


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
    needed: processes still share the cores, but Ray Data keeps slots for its own tasks). GPU actors: one
    per GPU by default; --actors beyond the GPUs share them (fractional GPUs), which adds decoding processes.
    ``local_cuda``: for a runtime started here, whether this machine's onnxruntime has CUDA (None: remote)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if provider == "auto":
        provider = "cuda" if gpus >= 1 and local_cuda is not False else "cpu"
    if provider == "cuda" and gpus < 1:
        raise UserError("--provider cuda: the Ray cluster has no GPU (resources: "
                        f"{cpus:g} CPU, {gpus:g} GPU); use --provider cpu")
    free = cpus - max(MIN_RESERVE_CPU, RESERVE_CPU_SHARE * cpus)
    if free <= 0:
        raise UserError(f"the Ray cluster has {cpus:g} CPU: too few for actors (Ray Data needs some for itself)")
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


class _Work:
    """The files of a run as the driver sends them: per file its path (bytes: any name), and for an image in
    a container, what its source reads it by (kind, container, key, size; or its bytes, ``inline``); the true
    class where the source knows it (None: from the path)."""

    TYPES = {"path": "binary", "kind": "string", "container": "binary", "key": "int64", "size": "int64",
             "inline": "binary"}

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in self.TYPES}
        self.truth: list[int | None] = []

    def add_files(self, paths: Sequence[str]) -> None:
        n = len(paths)
        self._extend(path=[os.fsencode(p) for p in paths], kind=[None] * n, container=[None] * n, key=[0] * n,
                     size=[-1] * n, inline=[None] * n)
        self.truth += [None] * n

    def add_members(self, m: Members) -> None:
        n, carried = len(m), m.inline
        self._extend(path=[os.fsencode(u) for u in m.units], kind=[m.kind] * n,
                     container=[os.fsencode(m.container)] * n, key=[0] * n if carried else list(m.keys),
                     size=list(m.sizes) or [-1] * n, inline=list(m.keys) if carried else [None] * n)
        self.truth += list(m.truth)

    def _extend(self, **values: list) -> None:
        for name, v in values.items():
            self.columns[name] += v

    def __len__(self) -> int:
        return len(self.truth)

    def path(self, i: int) -> str:
        return os.fsdecode(self.columns["path"][i])

    def tables(self, ids: Sequence[int], size: int):
        """The files ``ids`` as Arrow tables of ``size`` files, one per block (one actor call)."""
        import pyarrow as pa

        out = []
        for start in range(0, len(ids), size):
            part = ids[start:start + size]
            cols = {"id": pa.array(part, pa.int64())}
            for name, kind in self.TYPES.items():
                cols[name] = pa.array([self.columns[name][i] for i in part], getattr(pa, kind)())
            out.append(pa.table(cols))
        return out


def _truth(rows: Sequence[Row], truth: Sequence[int | None]) -> list[int] | None:
    """The true classes of rows, where their sources know them; None where every one comes from its path."""
    from fmnist_onnx.classify.predict import true_classes

    if all(t is None for t in truth):
        return None
    return [true_classes([r.path])[0] if t is None else t for r, t in zip(rows, truth, strict=True)]


def block_size(files: int, actors: int) -> int:
    """Enough blocks for every actor, at most MAX_BLOCK files each."""
    return max(MIN_BLOCK, min(MAX_BLOCK, math.ceil(files / (BLOCKS_PER_ACTOR * actors))))


# ---------------------------------------------------------------------------------------------- the driver

def _run(ray, ids: Sequence[int], work: _Work, size: int,
         pool: tuple[int, float, float], predictor: dict) -> Iterator:
    """Ray Data over the files: blocks of paths -> the actor pool -> Arrow batches of rows (id, indices, scores,
    error), streamed as they are done. A block whose actor dies is retried a few times on a restarted actor,
    then skipped (its files come back missing: max_errored_blocks, see _set_data_context) rather than retried
    for ever or failing the whole run."""
    n, per_cpu, per_gpu = pool
    remote = {"num_gpus": per_gpu} if per_gpu else {}
    ds = ray.data.from_arrow(work.tables(ids, size))
    # One block at a time per actor when isolating (size 1): a crash then takes down its own file only, not
    # the other blocks queued on the same actor.
    strategy = {"max_tasks_in_flight_per_actor": 1} if size == 1 else {}
    # batch_size: our blocks' size, so one block is one call (Ray also insists on it for GPU actors). No more
    # actors than blocks: an actor without a block only costs its start-up (and Ray Data warns about it).
    args = {"batch_size": size, "batch_format": "pyarrow", "fn_constructor_kwargs": predictor, "num_cpus": per_cpu,
            "compute": ray.data.ActorPoolStrategy(size=min(n, math.ceil(len(ids) / size)), **strategy), **remote}
    # Ray Data retries an actor's task for ever by default: a file that crashes the decoder would hang the run.
    # Ray 2.60 deprecates max_task_retries here, with no named replacement yet: used while it is accepted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ds = ds.map_batches(Predictor, max_task_retries=TASK_RETRIES, **args)
        except TypeError:
            ds = ds.map_batches(Predictor, **args)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _verbose() -> bool:
    return logging.getLogger().isEnabledFor(logging.INFO)


@contextlib.contextmanager
def _quiet_backend(quiet: bool):
    """Ray's C++ side (the driver's core worker) writes its errors to stderr itself, and Ray Data's own actor pool
    makes it write one on every successful run: "has constructor arguments in the object store and
    max_restarts > 0" (ray-project/ray#57733; the pool's actors restart, and the map function is in the object
    store). Only the level read from RAY_BACKEND_LOG_LEVEL when the core worker starts (in ray.init) can stop
    it: "fatal", unless the user chose a level. Setting it makes Ray log one line saying so, there and then:
    file descriptor 2 goes to /dev/null for ray.init's time (a failed init is an exception: its one line is
    ours). A local runtime started here inherits the level: its log files hold fatal errors only."""
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
        raise UserError(f"cannot connect to the Ray cluster at {address}: {_first_line(e)}{hint}") from None
    return True


def _set_data_context(ray) -> dict:
    """Ray Data settings for this run; returns the previous values, for ``_restore`` (a caller's own runtime
    keeps its settings). Our progress bar and summary only, unless -v: Ray Data's own bars and INFO lines are
    off. Blocks whose actor died are skipped rather than failing the run (their files are tried again)."""
    ctx = ray.data.DataContext.get_current()
    want = {"enable_progress_bars": False, "print_on_execution_start": _verbose(), "max_errored_blocks": -1}
    old = {k: getattr(ctx, k) for k in want if hasattr(ctx, k)}
    for k in old:
        setattr(ctx, k, want[k])
    if not _verbose():
        # CRITICAL: a block whose actor died is logged by Ray Data as an error with a traceback; we say it
        # ourselves, in one line, and give its files another try
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return old


def _restore(ray, old: dict) -> None:
    ctx = ray.data.DataContext.get_current()
    for k, v in old.items():
        setattr(ctx, k, v)


class RayEngine:
    """The pipeline's engine on Ray Data (classify.Engine): connects (or starts a local runtime), plans the actor
    pool, and turns the walk's chunks into Rows. Rows come in the order they are done."""

    def __init__(self, request: Request, address: str | None = None, actors: int | None = None) -> None:
        if actors is not None and actors < 1:
            raise UserError("--actors must be at least 1")
        self.ray = _import_ray()
        from fmnist_onnx.runtime import PROVIDERS, available_providers, open_session, resolve_provider

        open_session(request.model, "cpu")  # a broken or wrong model is one clear error here, before any cluster work
        self.request = request
        self.model_bytes = Path(request.model).read_bytes()
        self.settings, self.started, self.warnings = None, False, None
        if not _verbose():
            # Ray's and Ray Data's warnings (an idle actor, a deprecation) are about Ray, not about this run; -v shows
            # them. The filter holds until close(): Ray Data warns from its executor's thread.
            self.warnings = warnings.catch_warnings()
            self.warnings.__enter__()
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
        try:
            self.started = _connect(self.ray, address)
            local_runtime = self.started and not (address or os.environ.get("RAY_ADDRESS"))
            self.settings = _set_data_context(self.ray)
            local_cuda = PROVIDERS["cuda"] in available_providers() if local_runtime else None
            if local_runtime and request.provider == "cuda" and not local_cuda:
                resolve_provider("cuda")  # the local engine's error: onnxruntime here has no CUDA
            self.provider, self.workers, per_cpu, per_gpu = plan_pool(self.ray.cluster_resources(), request.provider,
                                                                      actors, local_cuda)
        except BaseException:
            self.close()
            raise
        self.pool = (self.workers, per_cpu, per_gpu)
        self.decoder = f"{decoder_name()} in Ray actors"
        self.max_chunk = MAX_CHUNK  # unused: Ray Data plans its own blocks
        log.info("Ray pool: %d actors, %g CPU and %g GPU each (%s)", self.workers, per_cpu, per_gpu, self.provider)

    def rows(self, items: Iterator[list[str] | Members | Row], encoding: str, observe=None) -> Iterator[Rows]:
        """Every file of ``items`` to the actors at once (Ray Data plans the blocks, whatever the chunks: no
        ``observe``), rows as they are done."""
        top_k = self.request.top_k
        files = _Work()
        for item in items:
            if isinstance(item, Row):  # a folder that cannot be listed, a damaged archive: its row at once
                yield rows_of([item], encoding, top_k)
            elif isinstance(item, Members):
                early = [i for i, k in enumerate(item.keys) if isinstance(k, images.ImageError)]
                if early:  # a member a compressed tar could not give (too large): its row at once
                    yield rows_of([Row(item.units[i], error=str(item.keys[i])) for i in early], encoding, top_k,
                                  [item.truth[i] for i in early])
                    item = item.keep([not isinstance(k, images.ImageError) for k in item.keys])
                files.add_members(item)
            else:
                files.add_files(item)
        if not len(files):
            return
        predictor = {"model": [self.ray.put(self.model_bytes)], "provider": self.provider,
                     "invert": self.request.invert, "top_k": top_k,
                     "batch_size": self.request.batch_size or DEFAULT_BATCH}
        returned = bytearray(len(files))

        def rows_of_batch(batch) -> Rows:
            fatal = batch["fatal"]
            if fatal.null_count < len(fatal):
                i = next(i for i, v in enumerate(fatal.to_pylist()) if v is not None)
                _raise_fatal(batch["fatal_exit"][i].as_py(), fatal[i].as_py())
            rows, truth = [], []
            for i, idx, sc, err in zip(batch["id"].to_pylist(), batch["indices"].to_pylist(),
                                       batch["scores"].to_pylist(), batch["error"].to_pylist(), strict=True):
                if returned[i]:
                    continue  # a block that Ray ran twice (a retry after its actor died): rows once
                returned[i] = 1
                rows.append(Row(files.path(i), idx or (), sc or (), err or ""))
                truth.append(files.truth[i])
            return rows_of(rows, encoding, top_k, _truth(rows, truth))

        ids = range(len(files))
        for batch in _run(self.ray, ids, files, block_size(len(files), self.workers), self.pool, predictor):
            yield rows_of_batch(batch)
        lost = [i for i in ids if not returned[i]]
        if lost:
            # Blocks whose actor died on every try (a file that crashes the decoder, or the OOM killer):
            # again file by file, so that only the culprits get an error row, as in the local engine.
            log.warning("%d files were in blocks that failed; trying them one by one", len(lost))
            for batch in _run(self.ray, lost, files, 1, self.pool, predictor):
                yield rows_of_batch(batch)
            crashed = [i for i in lost if not returned[i]]
            rows = [Row(files.path(i), error=CRASHED) for i in crashed]
            for row in rows:
                log.warning("%s: %s", visible(row.path), row.error)
            if rows:
                yield rows_of(rows, encoding, top_k, _truth(rows, [files.truth[i] for i in crashed]))

    def close(self) -> None:
        if self.settings is not None:
            _restore(self.ray, self.settings)
            self.settings = None
        if self.started:
            self.ray.shutdown()
            self.started = False
        if self.warnings is not None:
            self.warnings.__exit__(None, None, None)
            self.warnings = None
