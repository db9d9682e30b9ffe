"""The sources' registry: where images come from, a module per kind of input (contract.Source), imported only
when an input of its kind is named. A source is chosen by what the input is: ``uri`` for ``scheme://...``;
``tar`` for a file named .tar, .tar.gz, .tgz, .tar.bz2, .tbz2, .tbz, .tar.xz or .txz (archives.TAR_SUFFIXES);
``zip`` for .zip; ``parquet`` for .parquet; ``folder`` for other local files and folders (a folder is a folder
whatever its name).

The images inside a container are named in the rows as ``<container>::<member>`` (tar, zip) or
``<container>::row/<N>`` (Parquet, N counted from 0), the container as named on the command line: ``::`` after
an input that is a container. A loose file whose name holds ``::`` is a loose file: it is not under a
container input (``check_inputs`` refuses a folder or file input named ``<container input>::...``).

Adding a source: a module here with ``check`` and ``walk_batches`` (contract.Source; ``read``, for Members;
``read_many``, for the report), an entry in SOURCES, a test in ``kind_of`` for its inputs, and its name in the
sources of each engine that reads it (engines/__init__.py). An option of one source (the Parquet source's
--image-column) reaches its ``check`` and ``walk_batches`` as a keyword (``_options``), and its workers through
the Members it makes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
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
_SUFFIXES = {**dict.fromkeys(TAR_SUFFIXES, "tar"), ".zip": "zip", ".parquet": "parquet"}  # one list with archives
CONTAINERS = frozenset(_SUFFIXES.values())


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


def read(members: Members) -> list:
    """The bytes of each image of ``members`` (or its images.ImageError), in a worker: its source's ``read``."""
    return source(members.kind).read(members)


def member_of(path: str) -> tuple[str, str, str] | None:
    """(container, its source kind, member) where a row's ``path`` names an image inside a container: the
    container being the first prefix before a ``::`` that is an existing container file; None for a loose file
    (one that exists, or a name without ``::``)."""
    if os.path.lexists(path) or SEPARATOR not in path:
        return None
    at = path.find(SEPARATOR)
    while at >= 0:
        container = path[:at]
        kind = container_kind(container)
        if kind is not None and os.path.isfile(container):
            return container, kind, path[at + len(SEPARATOR):]
        at = path.find(SEPARATOR, at + 1)
    return None  # its own error: file not found


def read_path(path: str, image_column: str | None = None) -> bytes:
    """The bytes of a row's image, read again: ``read_paths`` of one; images.ImageError where it cannot be read."""
    data = next(read_paths([path], image_column))[1]
    if isinstance(data, Exception):
        raise data
    return data


def read_paths(paths: Iterable[str], image_column: str | None = None) -> Iterator[tuple[str, bytes | Exception]]:
    """(path, bytes or images.ImageError) of each rows' image, read again (the report draws up to a few thousand):
    a loose file, or a member (``member_of``). Each path once; the loose files first, then the members of each
    container together, in one pass over it (its source's ``read_many``: a compressed tar streamed once, a zip
    listed once), one image's bytes held at a time. ``image_column``: the run's --image-column, for a Parquet
    row."""
    inside: dict[tuple[str, str], dict[str, str]] = {}  # (container, kind) -> {member: path}
    for path in dict.fromkeys(paths):
        where = member_of(path)
        if where is None:
            yield path, _read_file(path)
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


def check_inputs(paths: Sequence[str], readable: Sequence[str], engine: str,
                 image_column: str | None = None) -> list[str]:
    """The inputs, each checked by its source before any work; one a chosen engine cannot read (``readable``:
    its sources) is a UserError naming the engines that can. ``image_column``: the Parquet inputs' column of
    images (--image-column), an error where no input is Parquet."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no PATH given: name folders or image files to classify")
    kinds = [kind_of(p) for p in paths]
    if image_column is not None and "parquet" not in kinds:
        raise UserError("--image-column names the image column of Parquet inputs, and no input is a .parquet file")
    for p, kind in zip(paths, kinds, strict=True):
        if kind not in readable:
            raise UserError(f"{visible(p)}: a {kind} input, which --engine {engine} cannot read (it reads "
                            f"{', '.join(readable)}){'; --engine ray reads URIs' if kind == 'uri' else ''}")
    containers = [p + SEPARATOR for p, k in zip(paths, kinds, strict=True) if k in CONTAINERS]
    for p in paths:
        inside = next((c for c in containers if p.startswith(c)), None)
        if inside is not None:
            raise UserError(f"{visible(p)}: its name starts with the input {visible(inside[:-2])} and '::', which "
                            f"would make its rows read as that container's; rename it, or classify it apart")
    for kind in dict.fromkeys(kinds):
        source(kind).check([p for p, k in zip(paths, kinds, strict=True) if k == kind],
                           **_options(kind, image_column))
    return list(paths)


def walk(roots: Sequence[str], recursive: bool, exclude: Sequence[str] = (),
         image_column: str | None = None) -> Iterator[Batch]:
    """Every unit under ``roots``, in the order they are named: consecutive inputs of one source walked by
    it together (a folder reached twice is walked once). ``image_column``: as for ``check_inputs``."""
    for kind, group in groupby(roots, key=kind_of):
        yield from source(kind).walk_batches(list(group), recursive, exclude, **_options(kind, image_column))
