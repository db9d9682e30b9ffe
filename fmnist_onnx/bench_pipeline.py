"""`fmnist-onnx bench classify`: the whole classify pipeline on any of its inputs (folders, tar and zip archives,
Parquet files, mixed), beside decoding alone and the naive loop.

Each contender runs over the same images from start to end (process starts included), best of ``repeats``
(timing.best_of); the result says how close the pipeline runs to its decoding limit. Decoding alone reads the
images through the same sources as classify's workers do (``sources.read`` for the images inside a container);
the naive loop reads them the plain way for their layout (files, Python's ``tarfile`` and ``zipfile``, pyarrow
rows), as a user's own script would. No torch here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from fmnist_onnx.classify.contract import Members
from fmnist_onnx.errors import UserError
from fmnist_onnx.machine import machine_info
from fmnist_onnx.runtime import PROVIDERS, open_session, resolve_provider
from fmnist_onnx.spec import IMAGE_SIZE
from fmnist_onnx.timing import Clock, best_of

log = logging.getLogger(__name__)

DECODE_CHUNK = 1024  # images per task of decoding alone
NAIVE_BATCH = 256


@dataclass
class PipelineRecord:
    """One way through the images, timed from start to end (process starts included)."""

    what: str
    images: int
    processes: int
    seconds: float
    images_per_s: float
    sources: str = "folder"  # the source kinds measured: "folder", "tar", "folder+parquet"...


@dataclass
class Workload:
    """What the contenders read, found once before any timing: the inputs as classify checked them, their
    source kinds, the loose files, the images inside containers (Members, by container) and the count;
    ``image_column``: the Parquet inputs' --image-column."""

    inputs: list[str]
    kinds: list[str]
    image_column: str | None = None
    files: list[str] = field(default_factory=list)
    members: list[Members] = field(default_factory=list)
    images: int = 0

    def decode_chunks(self) -> list[list[str] | Members]:
        """Decoding alone's tasks: loose files and each container's images, DECODE_CHUNK at a time."""
        loose = [self.files[i:i + DECODE_CHUNK] for i in range(0, len(self.files), DECODE_CHUNK)]
        inside = [m.take(i, i + DECODE_CHUNK) for m in self.members for i in range(0, len(m), DECODE_CHUNK)]
        return [*loose, *inside]

    def containers(self) -> list[tuple[str, str]]:
        """(kind, path) of each container input, in the order named."""
        return list(dict.fromkeys((m.kind, m.container) for m in self.members))


_readers = None  # in a decoding process: what it keeps open between tasks, as a worker does (_open_readers)


def _open_readers() -> None:
    """A decoding process's initializer: its sources.Readers."""
    global _readers
    from fmnist_onnx.classify import sources

    _readers = sources.Readers()


def _decode(item: list[str] | Members, readers=None):
    """classify's decoding of one task (images.preprocess_batch), its images read as a worker reads them
    (through ``readers``, else the process's own)."""
    from fmnist_onnx import images

    if isinstance(item, Members):
        return images.preprocess_batch((readers or _readers).read(item), count=len(item))
    return images.preprocess_batch(item)


def _decode_chunks(chunks: Sequence[list[str] | Members], workers: int) -> None:
    """Decode alone: classify's own decoding in ``workers`` forked processes (or this one)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers == 1:
        from fmnist_onnx.classify import sources

        with sources.Readers() as readers:
            for c in chunks:
                _decode(c, readers)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                             initializer=_open_readers) as pool:
        for _ in pool.map(_decode, chunks):
            pass


# ---------------------------------------------------------------------------------------------- the naive loop

def plain_images(files: Sequence[str], containers: Sequence[tuple[str, str]],
                 image_column: str | None = None) -> Iterator[str | tuple[str, bytes]]:
    """The images read the plain way for their layout, as a user's own script would: loose files by path, then
    each container's images as (row name, bytes) through tarfile, zipfile or pyarrow rows (``image_column``:
    the Parquet files' --image-column). Bounded as classify is: a member or value over images.MAX_FILE_BYTES
    is never read (a compressed tar's reading ends there: tarfile would inflate it to its end to go past it),
    one that cannot be read (encrypted, damaged) is skipped, and a damaged container ends its reading where its
    reader gives up; never an exception."""
    yield from files
    readers = {"tar": _plain_tar, "zip": _plain_zip, "parquet": partial(_plain_parquet, name=image_column)}
    for kind, path in containers:
        try:
            yield from readers[kind](path)
        except _DAMAGE as e:  # the images before the damage were read; classify gives the rest error rows
            log.info("%s: the naive loop stops reading it: %s", path, e)


def _damage() -> tuple[type[BaseException], ...]:
    """How tarfile, zipfile, pyarrow and the decompressors under them fail on a damaged file."""
    import lzma
    import tarfile
    import zipfile
    import zlib

    return (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error,
            lzma.LZMAError)


_DAMAGE = _damage()  # (pyarrow's ArrowException is a ValueError; bz2 and gzip say OSError)


def _plain_tar(path: str) -> Iterator[tuple[str, bytes]]:
    import tarfile

    from fmnist_onnx.archives import archive_kind
    from fmnist_onnx.images import MAX_FILE_BYTES, image_extensions

    exts, compressed = image_extensions(), archive_kind(path) == "tgz"
    with tarfile.open(path) as tf:  # any compression
        for m in tf:
            if m.isfile() and Path(m.name).suffix.lower() in exts:
                if m.size > MAX_FILE_BYTES:
                    if compressed:
                        return
                    continue
                yield f"{path}::{m.name}", tf.extractfile(m).read(m.size)  # (read(n) allocates n bytes first)


def _plain_zip(path: str) -> Iterator[tuple[str, bytes]]:
    import zipfile

    from fmnist_onnx.images import MAX_FILE_BYTES, image_extensions

    exts = image_extensions()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if Path(info.filename).suffix.lower() not in exts or info.file_size > MAX_FILE_BYTES:
                continue
            try:
                with zf.open(info) as f:  # at most what it declares: a liar inflates no further
                    data = f.read(info.file_size + 1)
            except (RuntimeError, *_DAMAGE):  # encrypted, an unknown method, a bad CRC
                continue
            yield f"{path}::{info.filename}", data


def _plain_parquet(path: str, name: str | None = None) -> Iterator[tuple[str, bytes]]:
    import pyarrow.parquet as pq

    from fmnist_onnx.classify.sources.parquet import image_column
    from fmnist_onnx.images import MAX_FILE_BYTES

    pf = pq.ParquetFile(path)
    column, struct = image_column(pf.schema_arrow, name)  # the user knows which column holds the images
    row = 0
    for batch in pf.iter_batches(batch_size=NAIVE_BATCH, columns=[column]):
        for r in batch.to_pylist():
            data = (r[column] or {}).get("bytes") if struct else r[column]
            if data is not None and len(data) <= MAX_FILE_BYTES:
                yield f"{path}::row/{row}", data
            row += 1


def naive_loop(images: Iterable[str | tuple[str, bytes]], model: Path, output: Path, provider: str = "cpu") -> None:
    """The loop a user writes first: one process, Pillow, batches of 256, onnxruntime, a CSV of path,label.
    ``images``: file paths, or (name, bytes) read from a container (``plain_images``)."""
    import csv
    from itertools import islice

    import onnxruntime as ort
    from PIL import Image

    from fmnist_onnx.spec import CLASSES

    sess = ort.InferenceSession(str(model), providers=[PROVIDERS[provider]])
    name = sess.get_inputs()[0].name
    stream = iter(images)
    with open(output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        while chunk := list(islice(stream, NAIVE_BATCH)):
            batch, xs = [], []
            for item in chunk:
                path, src = (item, item) if isinstance(item, str) else (item[0], io.BytesIO(item[1] or b""))
                try:
                    im = Image.open(src).convert("L")
                except Exception:  # noqa: BLE001 - the naive loop skips what Pillow cannot open
                    continue
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    im = im.resize((IMAGE_SIZE, IMAGE_SIZE))
                xs.append(np.asarray(im, dtype=np.float32) / 255.0)
                batch.append(path)
            if xs:
                logits = sess.run(None, {name: np.stack(xs)[:, None]})[0]
                w.writerows((p, CLASSES[k]) for p, k in zip(batch, logits.argmax(1), strict=True))


# ---------------------------------------------------------------------------------------------- the coordinator

_COORDINATOR = """
import json, resource, sys
from fmnist_onnx.classify import classify
inputs, model, out, workers, provider, batch, inference, column = json.loads(sys.argv[1]), *sys.argv[2:9]
s = classify(inputs, model, out, overwrite=True, workers=int(workers), provider=provider,
             batch_size=int(batch) if batch != "-" else None, inference=inference, image_column=column or None)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": r.ru_utime + r.ru_stime, "files": s.files}))
"""


def coordinator_cpu(load: Workload, one: list[str], model: Path, workers: int, provider: str,
                    batch_size: int | None, work: Path, inference: str = "auto") -> dict:
    """The CPU time of the process that walks and writes (its own, not its workers'), from two fresh runs:
    ``one`` (an image of each source kind in its layout, ``one_of_each``: start-up, i.e. interpreter, imports,
    pool, session) and all the inputs; the difference per file is the coordinator's cost, and 1 / that cost
    the ceiling of any number of cores."""
    import json
    import subprocess
    import sys

    def run(inputs: list[str]) -> dict:
        proc = subprocess.run([sys.executable, "-c", _COORDINATOR, json.dumps(inputs), str(model),
                               str(work / "c.csv"), str(workers), provider, str(batch_size or "-"), inference,
                               load.image_column or ""],
                              capture_output=True, text=True)
        if proc.returncode not in (0, 3):
            raise UserError(f"the coordinator run failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    start, full = run(one), run(load.inputs)
    us = 1e6 * max(0.0, full["cpu_s"] - start["cpu_s"]) / max(1, full["files"] - start["files"])
    return {"startup_cpu_s": round(start["cpu_s"], 3), "cpu_us_per_file": round(us, 2),
            "ceiling_images_per_s": round(1e6 / us) if us > 0 else None, "files": full["files"]}


def one_of_each(load: Workload, where: Path) -> list[str]:
    """Inputs holding the first image of each source kind in its layout (a file in a folder, a one-member tar
    or zip, a one-row Parquet file), so that the start-up run imports and opens what the full run does."""
    from fmnist_onnx.classify import sources

    where.mkdir()
    out = []
    if load.files:
        first = Path(load.files[0])
        (where / first.name).write_bytes(first.read_bytes())
        out.append(str(where))
    firsts = {m.kind: m for m in reversed(load.members)}  # the first Members of each kind
    for kind, m in firsts.items():
        data = next(iter(sources.read(m.take(0, 1))))
        if isinstance(data, Exception):
            raise UserError(f"its first {kind} image cannot be read ({data})")
        out.append(_ONE_WRITERS[kind](m, data, where))
    return out


_TAR_MODES = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tar.xz": "xz"}


def _one_tar(m: Members, data: bytes, where: Path) -> str:
    import tarfile

    suffix = next((s for s in _TAR_MODES if m.container.lower().endswith(s)), ".tar")
    dst = where / f"one{suffix}"
    info = tarfile.TarInfo(m.units[0].split("::", 1)[1])
    info.size = len(data)
    with tarfile.open(dst, f"w:{_TAR_MODES[suffix]}") as tf:
        tf.addfile(info, io.BytesIO(data))
    return str(dst)


def _one_zip(m: Members, data: bytes, where: Path) -> str:
    import zipfile

    dst = where / "one.zip"
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr(m.units[0].split("::", 1)[1], data)
    return str(dst)


def _one_parquet(m: Members, data: bytes, where: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(m.container)
    first = next(pf.iter_batches(batch_size=1))
    dst = where / "one.parquet"
    pq.write_table(pa.Table.from_batches([first.slice(0, 1)], schema=pf.schema_arrow), dst)
    return str(dst)


_ONE_WRITERS = {"tar": _one_tar, "zip": _one_zip, "parquet": _one_parquet}


def scaling_workers(cores: int) -> list[int]:
    """1, 2, 4, ... up to the core count, and the core count itself."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return [*counts, cores]


def _inputs(inputs: Sequence[str], model: Path, provider: str,
            image_column: str | None = None) -> tuple[str, Workload]:
    """The provider resolved and the inputs checked as classify checks them, then walked once, every file
    read once (every contender then reads from a warm page cache). One line for a missing input, a container
    that cannot be opened, inputs without images, a missing or wrong model, or a provider that is missing."""
    import os

    from fmnist_onnx import images
    from fmnist_onnx.classify import engines, sources
    from fmnist_onnx.text import visible

    paths = sources.check_inputs([os.fspath(p) for p in inputs], engines.entry("local").sources, "local",
                                 image_column)
    # The model is opened on the CPU: CUDA started in this process would not work in the processes that classify
    # forks from it.
    prov = resolve_provider(provider)
    open_session(model, "cpu")
    load = Workload(paths, sources.kinds(paths), image_column)
    for batch in sources.walk(paths, True, image_column=image_column):
        if batch.members is not None and batch.members.kind != "folder":
            load.members.append(batch.members)
        else:  # loose files, those whose rows are escaped (sources.loose_row) by their paths
            load.files.extend(batch.files if batch.members is None else batch.members.keys)
        load.images += len(batch.files)
    if not load.images:
        raise UserError(f"{visible(' '.join(paths))}: no image files in {'it' if len(paths) == 1 else 'them'} "
                        f"(looked for {', '.join(sorted(images.image_extensions())[:6])}, ...)")
    for p in [*load.files, *(path for _, path in load.containers())]:
        with contextlib.suppress(OSError), open(p, "rb") as f:
            while f.read(16 << 20):
                pass
    return prov, load


def bench_classify(
    inputs: str | Path | Sequence[str | Path],
    model: str | Path,
    workers: int | None = None,
    provider: str = "auto",
    batch_size: int | None = None,
    repeats: int = 1,
    on_record: Callable[[PipelineRecord], None] | None = None,
    clock: Clock = time.perf_counter,
    scaling: bool = False,
    coordinator: bool = True,
    inference: str = "auto",
    image_column: str | None = None,
) -> dict:
    """The classify pipeline (find, decode, infer, write) beside decoding alone and the naive loop, on the
    same inputs (what classify takes: folders, files, tar and zip archives, Parquet files), best of ``repeats``
    each (timed with ``clock``). Every file is read once first, so that all find a warm page cache.
    ``scaling``: the pipeline also with 1, 2, 4, ... workers up to ``workers``. ``coordinator``: the CPU cost
    of the process that walks and writes (``coordinator_cpu``). ``inference``: classify's --inference;
    ``image_column``: its --image-column (the Parquet inputs' column of images, for every contender).
    UserError for a bad input (as classify's), inputs without images, a missing or wrong model."""
    from fmnist_onnx import classify as cl
    from fmnist_onnx.classify.engines.local import default_workers

    model = Path(model)
    prov, load = _inputs([inputs] if isinstance(inputs, (str, Path)) else list(inputs), model, provider,
                         image_column)
    workers = workers or default_workers()
    records: list[PipelineRecord] = []
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as tmp:
        work = Path(tmp)

        def pipeline(w: int, out: str) -> Callable[[], object]:
            return lambda: cl.classify(load.inputs, model, work / out, batch_size=batch_size, workers=w,
                                       provider=prov, overwrite=True, inference=inference,
                                       image_column=image_column)

        def record(what: str, procs: int, run: Callable[[], object]) -> PipelineRecord:
            best = best_of(run, repeats, clock)
            rec = PipelineRecord(what, load.images, procs, best, load.images / best, "+".join(load.kinds))
            if on_record:
                on_record(rec)
            return rec

        chunks = load.decode_chunks()
        records += [
            record(f"classify pipeline (find, decode, infer, write; {workers} processes)", workers,
                   pipeline(workers, "classify.csv")),
            record(f"decode alone ({workers} processes)", workers, lambda: _decode_chunks(chunks, workers)),
            record("decode alone (1 process)", 1, lambda: _decode_chunks(chunks, 1)),
        ]
        curve = [asdict(record(f"classify pipeline ({w} processes)", w, pipeline(w, "scaling.csv")))
                 for w in (scaling_workers(workers) if scaling else [])]
        # last: the naive loop runs the model in this process (CUDA started here, no pipeline could fork after it)
        records.append(record(f"naive loop (1 process, Pillow, batches of {NAIVE_BATCH})", 1, lambda: naive_loop(
            plain_images(load.files, load.containers(), image_column), model, work / "naive.csv", prov)))
        coord = _coordinator(load, model, workers, prov, batch_size, work, inference) if coordinator else None
    return _result(load, model, prov, inference, workers, repeats, records, curve, coord)


def _coordinator(load: Workload, model: Path, workers: int, provider: str, batch_size: int | None, work: Path,
                 inference: str) -> dict:
    """coordinator_cpu's figures, or {"note": why not} where its one-image inputs cannot be made of these."""
    from fmnist_onnx.text import first_line

    try:
        one = one_of_each(load, work / "one")
    except Exception as e:  # noqa: BLE001 - a damaged first image, an Arrow error: said in one line, not a crash
        return {"note": f"not measured on these inputs: {first_line(e)}"}
    return coordinator_cpu(load, one, model, workers, provider, batch_size, work, inference)


def _result(load: Workload, model: Path, provider: str, inference: str, workers: int, repeats: int,
            records: list[PipelineRecord], curve: list[dict], coord: dict | None) -> dict:
    pipe, decode, naive = records[0], records[1], records[3]
    return {"machine": machine_info(), "folder": " ".join(load.inputs), "inputs": load.inputs,
            "sources": load.kinds, "images": load.images, "model": str(model), "provider": provider,
            "inference": inference, "workers": workers, "repeats": repeats, "results": [asdict(r) for r in records],
            "pipeline_pct_of_decode": 100 * pipe.images_per_s / decode.images_per_s,
            "pipeline_over_naive": pipe.images_per_s / naive.images_per_s, "scaling": curve,
            "coordinator": coord}


def format_classify(result: dict) -> str:
    inference = f", inference {result['inference']}" if result.get("inference", "auto") != "auto" else ""
    kinds = result.get("sources", ["folder"])
    where = (f"image files in {result['folder']} (" if kinds == ["folder"] else
             f"images from {result['folder']} ({'+'.join(kinds)}; ")
    lines = [f"{result['images']:,} {where}provider {result['provider']}{inference}, best of {result['repeats']}):",
             f"  {'what':<62} {'images/s':>10} {'seconds':>8}"]
    for r in result["results"]:
        lines.append(f"  {r['what']:<62} {r['images_per_s']:>10,.0f} {r['seconds']:>8.2f}")
    lines.append(f"the pipeline runs at {result['pipeline_pct_of_decode']:.0f}% of decoding alone with the same "
                 f"processes, {result['pipeline_over_naive']:.1f}x the naive loop")
    if result.get("scaling"):
        lines.append("scaling: " + ", ".join(f"{r['processes']} -> {r['images_per_s']:,.0f}" for r in result["scaling"])
                     + " images/s")
    c = result.get("coordinator")
    if c and "note" in c:
        lines.append(f"coordinator (the process that walks and writes): {c['note']}")
    elif c:
        ceiling = f"{c['ceiling_images_per_s']:,} images/s" if c["ceiling_images_per_s"] else "none measured"
        lines.append(f"coordinator (the process that walks and writes): {c['cpu_us_per_file']:.2f} us of CPU per "
                     f"file after {c['startup_cpu_s']:.2f} CPU-s of start-up; ceiling {ceiling}")
    return "\n".join(lines)
