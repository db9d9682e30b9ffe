"""The classify package's contract: the records and interfaces every other part of it shares, and nothing
above them. A request (``Request``, with the ``RunIdentity`` that decides its rows), the walk's units
(``Found``, ``Batch``), what an engine gives back (``Rows``), the summary, and the two seams that plug-ins fill:
``Source`` (where images come from: sources/) and ``Engine`` (where the model runs: engines/).

This module imports no other part of the package, and no engine or source: they import it.

Chunks adapt to the images: small at first (first rows come at once), then about a quarter second of work
each, at most the engine's ``max_chunk`` files (2048; 8192 where a batched stage runs the model: on the H100,
CUDA's path ran 1.18x faster with them, the CPU's 0.88x): big photos are journaled often, tiny PNGs go in big
chunks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from fmnist_onnx.spec import NUM_CLASSES
from fmnist_onnx.table import Row
from fmnist_onnx.text import visible

if TYPE_CHECKING:  # numpy only in annotations: the CLI reads this module's constants for its help, fast
    import numpy as np

FIRST_CHUNK = 64
MAX_CHUNK = 2048  # files a chunk holds at most where the decoding processes run the model
BATCHED_MAX_CHUNK = 8192  # ... where a batched stage does (fewer, bigger round trips through the parent)
CHUNK_SECONDS = 0.25
CHUNK_BYTES = 64 << 20  # member bytes (declared) a chunk of a container holds at most, beyond its first member
DEFAULT_BATCH = 512  # images per onnxruntime call where the model runs beside the decoder (the CPU)
CRASHED = "the decoder crashed on this file (its process died)"
NON_FINITE = "the model gave non-finite logits (NaN or infinity) for this image"
RECORD_MAX_BYTES = 256 << 20  # a run record names the inputs: a shell glob of 100,000 files is ~10 MB
# what a run record's rows are named by: 2 names a repeated archive member by its ordinal and escapes a loose file
# whose path holds '::' (docs/sources.md); a record without a version is 1, and --resume refuses it
RECORD_VERSION = 2
MAX_TOP_K = NUM_CLASSES  # --top-k at most: every class
INFERENCE_MODES = ("auto", "workers", "batched")  # where the local engine runs the model (--inference)


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
    provider_reason: str | None = None  # why this provider (--provider auto's rule: runtime.classify_provider)
    skipped_kinds: dict[str, int] = field(default_factory=dict)  # of the skipped, archive members that are no
    # file, by kind: "symlink" (to nothing in its archive), "device", "FIFO", "other"
    containers_skipped: int = 0  # of ``skipped``: archives and Parquet files in folders of images (not read)
    containers_skipped_first: list[str] = field(default_factory=list)  # the first few of them


class Found(NamedTuple):
    """One entry of the walk: an input file (kind 'file'), a file skipped as not an image ('skip'), or a
    folder that could not be listed ('unlistable': it gets an error row, since its files would be lost).
    A NamedTuple: made once per file, it must be cheap."""

    path: str
    kind: str
    error: str = ""


@dataclass(frozen=True)
class Members:
    """Images inside one container (an archive, a Parquet file) that a worker reads by position: the rows'
    paths (``<container>::<member>``, ``<container>::row/<N>``), what the source's ``read`` needs per image
    (``keys``: offsets, indices, row numbers, or the bytes themselves for a compressed stream) and the true
    classes the container knows (a ``.cls`` sidecar, a label column; -1 where none). Sliced, never copied per
    image, into the chunks of work."""

    kind: str  # the source that reads it (a name in sources.SOURCES)
    container: str
    units: list[str]
    keys: Sequence
    truth: Sequence[int]
    sizes: Sequence[int] = ()  # the members' declared sizes (tar: beside their offsets; zip; a stream's bytes)
    inline: bool = False  # the keys are the images' bytes themselves (a compressed tar, streamed by the walk)
    column: str | None = None  # Parquet: the image column named by --image-column (None: the source's rule)

    def __len__(self) -> int:
        return len(self.units)

    def carried(self) -> int:
        """The bytes that travel with the chunk (a compressed tar's members, read by the walk); 0 for keys that
        say where a worker reads them."""
        return sum(len(k) for k in self.keys if isinstance(k, bytes)) if self.inline else 0

    def take(self, start: int, stop: int) -> Members:
        return replace(self, units=self.units[start:stop], keys=self.keys[start:stop], truth=self.truth[start:stop],
                       sizes=self.sizes[start:stop])

    def keep(self, flags: Sequence[bool]) -> Members:
        """The images whose flag is true (--resume: those not done yet)."""
        pick = [i for i, f in enumerate(flags) if f]
        return replace(self, units=[self.units[i] for i in pick], keys=[self.keys[i] for i in pick],
                       truth=[self.truth[i] for i in pick],
                       sizes=[self.sizes[i] for i in pick] if len(self.sizes) else ())


class Batch(NamedTuple):
    """A run of the walk within one folder: its input files in walk order, the files skipped as not images, or
    the folder itself when it cannot be listed; or images inside a container (``members``, whose units are
    also ``files``). The walk's unit: the process that walks makes no object per file (at a million files, a
    microsecond per file is a second)."""

    files: list[str]
    skipped: list[str]
    unlistable: Found | None = None
    members: Members | None = None
    kinds: dict[str, int] | None = None  # of ``skipped``, the archive members that are no file, by kind


def units_of(item: list[str] | Members) -> list[str]:
    """The rows' paths of a chunk of work: loose files' paths, or a container's units."""
    return item.units if isinstance(item, Members) else item


def truth_of(item: list[str] | Members) -> Sequence[int] | None:
    """The true classes a chunk's source knows (a container's), or None: from the paths (predict.make_rows)."""
    return item.truth if isinstance(item, Members) else None


def part(item: list[str] | Members, start: int, stop: int) -> list[str] | Members:
    """Images ``start`` to ``stop`` of a chunk of work (a file alone, to isolate a crash)."""
    return item.take(start, stop) if isinstance(item, Members) else item[start:stop]


@dataclass
class Rows:
    """A chunk of rows as an engine gives them back: encoded for the sink, plus what the summary counts, as
    arrays (the parent never makes a Python object per file)."""

    data: bytes  # the rows, as the sink's text format (CSV without header, or JSONL)
    indices: np.ndarray  # int16 [n]: top-1 class, -1 for a failed file
    truth: np.ndarray  # int16 [n]: the true class the source knows (folder names, a sidecar, a label), -1 where none
    errors: list[str]  # "" where the file was classified
    seconds: float = 0.0  # decoding time of the chunk (chunk sizing)
    paths: Sequence[str] | None = None  # set by the engine in the parent (not sent back by workers)

    def __len__(self) -> int:
        return len(self.indices)


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
    own_files: tuple[str, ...] = ()  # what the run writes (run_files) that the walk leaves out (request.py)
    image_column: str | None = None  # --image-column: the Parquet inputs' column of images (None: the rule)


@dataclass(frozen=True)
class RunIdentity:
    """What decides an output's rows: ``--resume`` continues only the run that wrote the journal.

    Kept beside the journal as ``<output>.partial.run.json``, written before the journal exists, and beside
    the finished output as ``<output>.run.json`` (so that --resume on a finished output is checked too).
    Options that do not change a row (workers, batch size, provider, engine) are not part of it. ``writes``
    is not either: the files the run writes beside its table that the walk could read as images (the confusion
    PNG, the --report page), as absolute paths, so that a later run knows them as this tool's own."""

    model_sha256: str
    invert: str
    top_k: int
    recursive: bool
    inputs: tuple[str, ...]  # as named on the command line: rows hold the paths the walk made of them
    cwd: str | None  # where relative inputs were named from (None when all are absolute)
    image_column: str | None = None  # --image-column; left out of the record when not given (older records)
    writes: tuple[str, ...] = ()  # left out where empty (older records have none)
    version: int = RECORD_VERSION  # of the rows' names: --resume continues only a record of this version

    @classmethod
    def of(cls, model: str | Path, invert: str, top_k: int, recursive: bool, roots: Sequence[str],
           image_column: str | None = None, writes: Sequence[str] = ()) -> RunIdentity:
        from fmnist_onnx.files import sha256_file

        relative = any(not os.path.isabs(r) for r in roots)
        return cls(sha256_file(model), invert, top_k, recursive, tuple(roots), os.getcwd() if relative else None,
                   image_column, tuple(os.path.abspath(w) for w in writes))

    @classmethod
    def from_json(cls, text: str) -> RunIdentity:
        """The record as written by ``to_json``; ValueError naming what is wrong with it otherwise."""
        try:
            raw = json.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deep") from None
        types = {"model_sha256": str, "invert": str, "top_k": int, "recursive": bool, "inputs": list,
                 "cwd": (str, type(None)), "image_column": str, "writes": list, "version": int}
        optional = {"image_column", "writes", "version"}
        if type(raw) is not dict or not set(types) - optional <= set(raw) <= set(types):
            raise ValueError(f"expected the fields {', '.join(types)} (image_column, writes and version where given)")
        for name, kind in types.items():
            if name not in raw:
                continue
            if not isinstance(raw[name], kind) or (kind is int and type(raw[name]) is bool):
                raise ValueError(f"{name} is {type(raw[name]).__name__}")
        for name in ("inputs", "writes"):
            if not all(type(i) is str for i in raw.get(name, ())):
                raise ValueError(f"{name} are not all text")
        if not all(os.path.isabs(w) for w in raw.get("writes", ())):
            raise ValueError("writes are not all absolute paths")
        return cls(**{"version": 1, **raw, "inputs": tuple(raw["inputs"]),  # no version: before there was one
                      "writes": tuple(raw.get("writes", ()))})

    def to_json(self) -> str:
        record = asdict(self)
        if self.image_column is None:  # a run without --image-column keeps the record it always had
            del record["image_column"]
        if not self.writes:
            del record["writes"]
        return json.dumps(record, indent=1) + "\n"

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
        if self.image_column != old.image_column:
            then, now = ("not given" if c is None else repr(c) for c in (old.image_column, self.image_column))
            diffs.append(f"--image-column ({then} then, {now} now)")
        return [visible(d) for d in diffs]


class Engine(Protocol):
    """What the pipeline needs of an engine (engines/local.py, engines/ray.py). Made from the checked Request
    with its options (checked there, one line each: no process, no connection yet), then used as a context
    manager: ``with`` starts what it runs on (``open``: processes forked, a cluster joined, the model checked
    where it runs), its end stops it all (``close``), whatever ended the block. ``rows`` only within it."""

    provider: str  # the provider that runs the model (a name in runtime.PROVIDER_TABLE); set by open at the latest
    workers: int  # decoding processes, or Ray actors; set by open at the latest
    decoder: str  # in words, for the summary
    max_chunk: int  # files a chunk of work_items holds at most

    def __enter__(self) -> Engine:
        """``open()``: the engine, started."""

    def __exit__(self, *exc) -> None:
        """``close()``."""

    def rows(self, items: Iterator[list[str] | Members | Row], encoding: str,
             observe: Callable[[float, int], None]) -> Iterator[Rows]:
        """Rows for the work items, encoded for the sink; ``observe(seconds, files)`` after each chunk decoded
        (it sizes the chunks to come)."""

    def close(self) -> None:
        """Stop what ``open`` started (what it started of it, where it failed); idempotent, and it never raises:
        it runs on the way out of a run, where the error that ended it is the one to tell."""


class Source(Protocol):
    """Where images come from (sources/): a module per kind of input, found by ``sources.kind_of``. A source
    checks the inputs it is given before any work and walks them in a fixed order, as Batches of work units: a
    path (folders, URIs), or ``Members`` of a container (tar, zip, Parquet), which its ``read`` turns into
    bytes in the worker that decodes them."""

    def check(self, inputs: Sequence[str]) -> list[str]:
        """The inputs as they will be walked; UserError (one line) for one that does not exist."""

    def walk_batches(self, inputs: Sequence[str], recursive: bool, exclude: Sequence[str] = ()) -> Iterator[Batch]:
        """Every unit under ``inputs``, in a deterministic order; ``exclude``: the run's own files, left out."""

    # Sources of Members also have: read(members: Members) -> Iterable[bytes | images.ImageError], in a worker:
    # the members' bytes in order, one at a time where it can (a worker holds one member while it decodes it).
    # A source that keeps state between chunks (open files) keeps it on a reader, not in module globals: its
    # ``reader()`` gives an object with that ``read`` and ``close()``, which a worker's sources.Readers makes
    # at its first chunk of that source and closes as the worker ends.
