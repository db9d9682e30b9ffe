"""The sources' registry: where images come from, a module per kind of input (contract.Source), imported only
when an input of its kind is named. A source is chosen by what the input is: ``uri`` for ``scheme://...``;
``tar`` for a file named .tar, .tar.gz, .tgz, .tar.bz2, .tbz2, .tbz, .tar.xz, .txz, .tar.zst or .tzst
(archives.TAR_SUFFIXES);
``zip`` for .zip; ``parquet`` for .parquet; ``folder`` for other local files and folders (a folder is a folder
whatever its name).

What an input names (``inputs``): a path that does not exist as named is a pattern, expanded as WebDataset's
``braceexpand`` expands it (``train-{000000..000005}.tar``, zero padding kept; at most MAX_PATTERN_NAMES names,
each of which must exist), and the run record keeps the pattern. A folder with no image file under it (as far
as --recursive goes) and at least one container file is a folder of shards (SHARDS): its containers are read
in walk order (names sorted per folder, depth first), each by its source, as if named one by one; its other
files are skipped. In a folder with images, container files are skipped like any other file, and the summary
names them (``Seen``).

The images inside a container are named in the rows as ``<container>::<member>`` (tar, zip) or
``<container>::row/<N>`` (Parquet, N counted from 0), the container as named on the command line: ``::`` after
an input that is a container. A member name that the archive repeats is ``<member>::<k>`` from its second
(members.Repeats). A loose file's row is its path, escaped where it holds ``::`` or ``\\:`` (``loose_row``): so
a row holds ``::`` if and only if it names an image inside a container, and every row names one image.

Adding a source: a module here with ``check`` and ``walk_batches`` (contract.Source; ``read``, for Members;
``read_many``, for the report), an entry in SOURCES, a test in ``kind_of`` for its inputs, and its name in the
sources of each engine that reads it (engines/__init__.py). An option of one source (the Parquet source's
--image-column) reaches its ``check`` and ``walk_batches`` as a keyword (``_options``), and its workers through
the Members it makes.
"""

from __future__ import annotations

import functools
import os
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from itertools import groupby

from fmnist_onnx.archives import TAR_SUFFIXES
from fmnist_onnx.classify.contract import Batch, Members
from fmnist_onnx.errors import UserError
from fmnist_onnx.text import visible

SOURCES: dict[str, str] = {
    "folder": "fmnist_onnx.classify.sources.folder",
    "uri": "fmnist_onnx.classify.sources.uri",
    "tar": "fmnist_onnx.classify.sources.tar",
    "zip": "fmnist_onnx.classify.sources.zipped",  # not zip.py: the package would lose the builtin zip
    "parquet": "fmnist_onnx.classify.sources.parquet",
}
SEPARATOR = "::"  # between a container and its member in a row's path
ESCAPE = "\\"  # in a loose file's row: '\\' is a backslash of its path, '\:' a colon
_SUFFIXES = {**dict.fromkeys(TAR_SUFFIXES, "tar"), ".zip": "zip", ".parquet": "parquet"}  # one list with archives
CONTAINERS = frozenset(_SUFFIXES.values())
SHARDS = "shards"  # a folder of shards: not a source; its containers are read by theirs
MAX_PATTERN_NAMES = 100_000  # names one pattern may make (a shell's own limit is the command line)
_WORDS = {"tar": "tar archive", "zip": "zip archive", "parquet": "Parquet file"}


def is_uri(path: str) -> bool:
    """'s3://bucket/x', 'gs://...', 'file:///...': read through pyarrow's file systems."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").replace("-", "").isalnum() and len(scheme) > 1


def container_kind(path: str) -> str | None:
    """'tar', 'zip' or 'parquet' by the name's suffix (any case), else None."""
    name = path.lower()
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def kind_of(path: str) -> str:
    """The source that reads ``path``."""
    if is_uri(path):
        return "uri"
    kind = container_kind(path)
    return kind if kind is not None and not os.path.isdir(path) else "folder"


def source(kind: str):
    """The module of source ``kind`` (contract.Source)."""
    return import_module(SOURCES[kind])


def read(members: Members) -> Iterable:
    """The bytes of each image of ``members`` (or its images.ImageError), in a worker: its source's ``read``,
    one member at a time where the source can (images.preprocess_batch takes them as they come)."""
    return source(members.kind).read(members)


class Readers:
    """What a process that reads containers' members keeps from one chunk to the next (a local worker's
    reader, a Ray actor): one reader per source that keeps state between chunks (its module's ``reader()``: an
    object with ``read(members)`` as the module's, and ``close()``), made at its first chunk and closed with
    this; a source without one is read by its module's ``read``. A context manager."""

    def __init__(self) -> None:
        self.open: dict[str, object] = {}  # source kind -> its reader

    def read(self, members: Members) -> Iterable:
        """``read``, through the source's reader where it has one."""
        module = source(members.kind)
        if not hasattr(module, "reader"):
            return module.read(members)
        if members.kind not in self.open:
            self.open[members.kind] = module.reader()
        return self.open[members.kind].read(members)

    def close(self) -> None:
        """Close every reader (never raises: a process that closes them is on its way out)."""
        for reader in self.open.values():
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - an open file of a finished run: nothing left to tell
                pass
        self.open.clear()

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def loose_row(path: str) -> str:
    """A loose file's row name: its path; where the path holds ``::`` or ``\\:``, each ``\\`` doubled and each
    ``:`` written ``\\:``. An escaped row holds ``\\:`` and never ``::``, a path left as it is neither, a
    container's row always ``::``: no two images share a row, and ``loose_path`` reverses it."""
    if SEPARATOR not in path and ESCAPE + ":" not in path:
        return path
    return path.replace(ESCAPE, ESCAPE * 2).replace(":", ESCAPE + ":")


def loose_path(row: str) -> str:
    """The path of a loose file's row (``loose_row`` undone)."""
    return re.sub(r"\\(.)", r"\1", row, flags=re.DOTALL) if ESCAPE + ":" in row else row


def member_of(path: str) -> tuple[str, str, str] | None:
    """(container, its source kind, member) where a row's ``path`` names an image inside a container: the
    container being the first prefix before a ``::`` that is an existing container file; None for a loose file
    (a row without ``::``: ``loose_row``) or a row whose container is gone."""
    if SEPARATOR not in path:
        return None
    at = path.find(SEPARATOR)
    while at >= 0:
        container = path[:at]
        kind = container_kind(container)
        if kind is not None and os.path.isfile(container):
            return container, kind, path[at + len(SEPARATOR):]
        at = path.find(SEPARATOR, at + 1)
    return None  # a loose file of an earlier version's table (rows were not escaped), or its own error


def read_path(path: str, image_column: str | None = None) -> bytes:
    """The bytes of a row's image, read again: ``read_paths`` of one; images.ImageError where it cannot be read."""
    data = next(read_paths([path], image_column))[1]
    if isinstance(data, Exception):
        raise data
    return data


def read_paths(paths: Iterable[str], image_column: str | None = None) -> Iterator[tuple[str, bytes | Exception]]:
    """(path, bytes or images.ImageError) of each rows' image, read again (the report draws up to a few thousand):
    a loose file (``loose_row``), or a member (``member_of``). Each path once; the loose files first, then the
    members of each container together, in one pass over it (its source's ``read_many``: a compressed tar
    streamed once, a zip listed once), one image's bytes held at a time. ``image_column``: the run's
    --image-column, for a Parquet row."""
    inside: dict[tuple[str, str], dict[str, str]] = {}  # (container, kind) -> {member: path}
    for path in dict.fromkeys(paths):
        where = member_of(path)
        if where is None:
            yield path, _read_file(loose_path(path))
        else:
            inside.setdefault(where[:2], {})[where[2]] = path
    for (container, kind), wanted in inside.items():
        try:
            for member, data in source(kind).read_many(container, list(wanted), **_options(kind, image_column)):
                if member in wanted:
                    yield wanted.pop(member), data
        except Exception as e:  # noqa: BLE001 - a damaged archive, an Arrow error: the figures' note
            from fmnist_onnx.images import ImageError

            error = ImageError(f"cannot read it from {container}: {e}")
            for path in wanted.values():
                yield path, error


def _read_file(path: str) -> bytes | Exception:
    from fmnist_onnx import images

    try:
        return images.read_file(path)
    except images.ImageError as e:
        return e
    except ValueError:  # a name with a NUL byte (a crafted table): no file has it
        return images.ImageError("not a possible file name")


def _options(kind: str, image_column: str | None) -> dict:
    """The keywords a source takes beyond the Source protocol's: the Parquet source's image column."""
    return {"image_column": image_column} if kind == "parquet" else {}


def check_inputs(paths: Sequence[str], readable: Sequence[str], engine: str, image_column: str | None = None,
                 recursive: bool = True, exclude: Iterable[str] = ()) -> list[str]:
    """The inputs as named (patterns kept: the run record holds them), each checked by its source before any
    work, the containers of a folder of shards with them (``inputs``); one a chosen engine cannot read
    (``readable``: its sources) is a UserError naming the engines that can. ``image_column``: the Parquet
    inputs' column of images (--image-column), an error where no input is Parquet. ``exclude``: the run's own
    files (left out of folders, as by the walk)."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no PATH given: name folders or image files to classify")
    found = inputs(paths, recursive, exclude)
    named = [(p, "folder" if k == SHARDS else k) for p, k in found]
    units = named + [(c, container_kind(c)) for p, k in found if k == SHARDS
                     for c in _shard_files(p, recursive, exclude)]
    kinds = [k for _, k in units]
    if image_column is not None and "parquet" not in kinds:
        raise UserError("--image-column names the image column of Parquet inputs, and no input is a .parquet file")
    for p, kind in units:
        if kind not in readable:
            raise UserError(f"{visible(p)}: a {kind} input, which --engine {engine} cannot read (it reads "
                            f"{', '.join(readable)}){'; --engine ray reads URIs' if kind == 'uri' else ''}")
    for kind in dict.fromkeys(kinds):
        source(kind).check([p for p, k in units if k == kind], **_options(kind, image_column))
    return list(paths)


def kinds(paths: Sequence[str], recursive: bool = True, exclude: Iterable[str] = ()) -> list[str]:
    """The sources that read ``paths`` (``inputs``: a folder of shards by its containers'), each once, in order."""
    found: list[str] = []
    for p, kind in inputs(paths, recursive, exclude):
        found += ([container_kind(c) for c in _shard_files(p, recursive, exclude)] if kind == SHARDS else [kind])
    return list(dict.fromkeys(found))


def names(paths: Sequence[str]) -> list[str]:
    """The paths with their patterns expanded (``expand``)."""
    return [n for p in paths for n in expand(p)]


def inputs(paths: Sequence[str], recursive: bool = True, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(name, kind) of every input ``paths`` make, in order: patterns expanded (``expand``), a folder of shards
    (no image file under it as far as the walk goes, at least one container file) of kind SHARDS."""
    out = []
    for name in names(paths):
        kind = kind_of(name)
        if kind == "folder" and os.path.isdir(name):
            images, containers = source("folder").survey(name, recursive, tuple(_SUFFIXES), exclude)
            kind = SHARDS if containers and not images else kind
        out.append((name, kind))
    return out


def expand(path: str) -> list[str]:
    """The names an input stands for: itself where it exists (or is a URI, or holds no brace); else its
    pattern expanded as WebDataset's ``braceexpand`` expands it (``train-{000000..000005}.tar``: zero padding
    kept), each name an existing file or folder, at most MAX_PATTERN_NAMES: else one line. A name that makes
    no other names stays itself (its source says it is missing)."""
    if "{" not in path or is_uri(path) or os.path.lexists(path):
        return [path]
    made = _pattern(path)
    if made is None:
        return [path]
    missing = [n for n in made if not os.path.lexists(n)]
    if missing:
        raise UserError(f"{visible(missing[0])}: no such file or folder (the pattern {visible(path)}: "
                        f"{len(missing):,} of its {len(made):,} names missing)")
    return list(made)


@functools.lru_cache(maxsize=4)  # a run expands its patterns to check them, then to walk (twice with --resume)
def _pattern(path: str) -> tuple[str, ...] | None:
    """The names braceexpand makes of ``path``; None where it makes only ``path`` or its braces do not
    balance; UserError past MAX_PATTERN_NAMES. Counted first: braceexpand holds each range as a list, so
    ``{0..99999999999}`` would fill the memory."""
    from braceexpand import braceexpand

    try:
        count = _count(path)
    except (ValueError, RecursionError):
        return None
    if count > MAX_PATTERN_NAMES:
        raise UserError(f"{visible(path)}: the pattern makes {count:,} names, more than {MAX_PATTERN_NAMES:,}; "
                        "name fewer, or the folder that holds them")
    made = tuple(braceexpand(path))
    return None if made == (path,) else made


_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")  # braceexpand's own
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


def _count(pattern: str) -> int:
    """How many names braceexpand makes of ``pattern``, on its grammar (the product of its brace
    expressions'), without making them; ValueError where the braces do not balance."""
    total, start, depth, pos = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":  # an escaped character
            pos += 2
            continue
        if c == "{":
            start = pos if depth == 0 else start
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                total *= _count_expression(pattern[start + 1:pos])
        pos += 1
    if depth:
        raise ValueError("unbalanced braces")
    return total


def _count_expression(expr: str) -> int:
    """The names of one brace expression: a range of integers or letters, a list (the sum of its items'), or
    else a pattern in literal braces."""
    m = _INT_RANGE.match(expr)
    if m:
        return abs(int(m[2]) - int(m[1])) // ((int(m[3]) or 1) if m[3] else 1) + 1
    m = _CHAR_RANGE.match(expr)
    if m:  # braceexpand's slice of its alphabet (at most 52 letters)
        letters, step = string.ascii_uppercase + string.ascii_lowercase, (int(m[3]) or 1) if m[3] else 1
        a, b = letters.index(m[1]), letters.index(m[2])
        return len(letters[a:b + 1:step] if a < b else letters[a:(b or -len(letters)) - 1:-step])
    items, start, depth, pos = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth or not items:
        return _count(expr)
    return sum(_count(item) for item in [*items, expr[start:]])


def _shard_files(folder: str, recursive: bool, exclude: Iterable[str]) -> list[str]:
    """The containers of a folder of shards, in walk order."""
    return [p for b in source("folder").walk_batches([folder], recursive, exclude) for p in b.skipped
            if container_kind(p)]


@dataclass
class Seen:
    """What a walk passed over, for the run's last words: the files it skipped by suffix until it found
    anything with a row (the line of a run that found no image), the containers it read, and the containers
    it skipped in folders of images (the summary names them)."""

    rows: bool = False
    skipped: Counter = field(default_factory=Counter)  # suffix -> files
    read: Counter = field(default_factory=Counter)  # container kind -> files
    beside: list[str] = field(default_factory=list)  # the first few containers skipped beside images
    beside_count: int = 0

    def add(self, batch: Batch, folder: bool) -> None:
        if not self.rows:
            self.rows = bool(batch.files) or batch.unlistable is not None
            self.skipped.update(os.path.splitext(p.rpartition(SEPARATOR)[2])[1].lower() for p in batch.skipped)
        if folder and batch.skipped:
            inside = [p for p in batch.skipped if p.lower().endswith(_CONTAINER_SUFFIXES)]
            self.beside_count += len(inside)
            self.beside += inside[:10 - len(self.beside)]

    def nothing(self, roots: Sequence[str]) -> str:
        """The line of a run whose walk gave no row: what it found instead."""
        found = [f"{n:,} {_WORDS[k]}{'s' if n > 1 else ''} read" for k, n in self.read.items()]
        found += [f"{n:,} {s or 'suffixless'} file{'s' if n > 1 else ''}" for s, n in self.skipped.most_common(5)]
        more = sum(self.skipped.values()) - sum(n for _, n in self.skipped.most_common(5))
        found += [f"{more:,} other files"] if more else []
        what = ", ".join(found) + " skipped" if self.skipped else ", ".join(found) or "no files in it"
        return (f"no images in {', '.join(visible(r) for r in roots)}: {what} (images are the suffixes Pillow "
                "reads: .png, .jpg, .bmp, .webp, ...)")


_CONTAINER_SUFFIXES = tuple(_SUFFIXES)


def walk(roots: Sequence[str], recursive: bool, exclude: Sequence[str] = (),
         image_column: str | None = None, seen: Seen | None = None) -> Iterator[Batch]:
    """Every unit under ``roots``, in the order they are named (``inputs``): consecutive inputs of one source
    walked by it together (a folder reached twice is walked once), a folder of shards container by container.
    ``image_column``: as for ``check_inputs``. ``seen``: filled with what the walk passed over."""
    seen = Seen() if seen is None else seen
    for kind, group in groupby(inputs(roots, recursive, exclude), key=lambda named: named[1]):
        paths = [p for p, _ in group]
        if kind == SHARDS:
            batches = (b for p in paths for b in _shards(p, recursive, exclude, image_column, seen))
        else:
            seen.read.update({kind: len(paths)} if kind in CONTAINERS else {})
            batches = source(kind).walk_batches(paths, recursive, exclude, **_options(kind, image_column))
            batches = _loose_rows(batches) if kind == "folder" else batches
        for batch in batches:
            seen.add(batch, kind == "folder")
            yield batch
            del batch  # before the next is read: a compressed tar's batch holds its members' bytes


def _shards(folder: str, recursive: bool, exclude: Sequence[str], image_column: str | None,
            seen: Seen) -> Iterator[Batch]:
    """A folder of shards: its containers in walk order, each read by its source; its other files skipped,
    and a folder in it that cannot be listed an error row, as the folder source gives them."""
    for batch in _loose_rows(source("folder").walk_batches([folder], recursive, exclude)):
        inside = [p for p in batch.skipped if container_kind(p)]
        if batch.files or batch.unlistable is not None or len(inside) < len(batch.skipped):
            yield batch._replace(skipped=[p for p in batch.skipped if not container_kind(p)])
        for kind, group in groupby(inside, key=container_kind):
            paths = list(group)
            seen.read[kind] += len(paths)
            yield from source(kind).walk_batches(paths, recursive, exclude, **_options(kind, image_column))


def _loose_rows(batches: Iterator[Batch]) -> Iterator[Batch]:
    """The folder source's batches, their rows named by ``loose_row``: a batch with a path to escape goes as the
    folder's Members (units: the rows' names; keys: the paths its workers read). One join and a search a
    folder: a colon in a file's name is rare."""
    for b in batches:
        odd = b.unlistable is not None and ":" in b.unlistable.path
        if b.members is not None or not (odd or ":" in "".join(b.files)):
            yield b
            continue
        units = [loose_row(p) for p in b.files]
        members = None
        if units != b.files:
            from fmnist_onnx.images import true_class

            truth = [-1 if c is None else c for c in map(true_class, b.files)]
            members = Members("folder", "", units, list(b.files), truth)
        gone = b.unlistable and b.unlistable._replace(path=loose_row(b.unlistable.path))
        yield Batch(units, b.skipped, gone, members)
