"""The tar source: tar archives (the WebDataset layout of shards, or any tar of images), read in place, never
unpacked to disk. A plain ``.tar`` is indexed by walking its 512-byte headers over a memory map (archives.py:
a few us a member, where Python's tarfile takes 48) and the workers read each image at its offset; a compressed
tar (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``; ``.tar.zst`` with the [zstd] extra) cannot be read at an
offset, so it is streamed once here and its images' bytes go to the workers, STREAM_BYTES at a time at most (or
one member bigger than that); a member over the byte limit there stops the stream (archives.stream_tar). A
damaged archive gives every member before the damage its row, then one error row, ``<archive>::``, saying where
it broke. Links are read as the member they reach; members that are no file (a symlink out of the archive, a
device) are counted by kind."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from fmnist_onnx import archives
from fmnist_onnx.classify.contract import CHUNK_BYTES, Batch, Members
from fmnist_onnx.classify.sources import members
from fmnist_onnx.errors import UserError
from fmnist_onnx.images import ImageError

log = logging.getLogger(__name__)

STREAM_BATCH = 2048  # members of a compressed tar held at once (their bytes are in memory until decoded) ...
STREAM_BYTES = CHUNK_BYTES  # ... and their bytes at most, beyond one member bigger than that


def check(paths: Sequence[str]) -> list[str]:
    if any(p.lower().endswith(archives.ZSTD_SUFFIXES) for p in paths) and archives.zstd_missing():
        raise UserError(archives.ZSTD_MISSING)
    return members.check_files(paths, "tar archive")


def walk_batches(paths: Sequence[str], recursive: bool = True, exclude: Sequence[str] = ()) -> Iterator[Batch]:
    for path in paths:
        if archives.archive_kind(path) == "tar":
            yield _indexed(path)
        else:
            yield from _streamed(path)


def _indexed(path: str) -> Batch:
    try:
        index = archives.index_tar(path)
    except (archives.ArchiveDamaged, OSError) as e:
        return members.broken(path, e)
    if index.damage:
        log.warning("%s: %s", path, index.damage)

    def sidecars(picks: list[int]) -> list:
        return archives.read_small(path, [index.offsets[i] for i in picks], [index.sizes[i] for i in picks])

    return members.batch("tar", path, index.names, index.offsets, index.sizes, sidecars, index.damage,
                         special=index.skipped)


def _streamed(path: str) -> Iterator[Batch]:
    """A compressed tar in one pass, a few thousand members or STREAM_BYTES at a time, cut between samples (an
    image and its sidecar stay together): a batch is cut before a member whose declared size would take it
    past STREAM_BYTES, before that member is read, so that the walk holds one batch at a time, at most
    STREAM_BYTES or one member. A sample's small members (sidecars) join it past the bound."""
    names: list[str] = []
    data: list = []
    special: list[tuple[str, str]] = []  # members that are no file: skipped, counted by kind
    repeats = members.Repeats()  # a name repeated in a later batch is still a repeat
    held = 0
    try:
        for name, size, read in archives.stream_tar(path):
            full = len(names) >= STREAM_BATCH or held + size > STREAM_BYTES
            if full and names and (members.sample_key(name) != members.sample_key(names[-1])
                                   or size > members.MAX_SIDECAR_BYTES):
                yield _inline(path, names, data, repeats, special=special)
                names, data, held, special = [], [], 0, []
            content = read()
            if isinstance(content, archives.Skipped):
                special.append((name, content.kind))
                continue
            names.append(name)
            data.append(content)
            held += len(content) if isinstance(content, bytes) else 0
            del content
    except (archives.ArchiveDamaged, OSError) as e:
        yield _inline(path, names, data, repeats, members.damage(e), special)
        return
    if names or special:
        yield _inline(path, names, data, repeats, special=special)


def _inline(path: str, names: list[str], data: list, repeats: members.Repeats, damage: str | None = None,
            special: list = ()) -> Batch:
    sizes = [len(d) if isinstance(d, bytes) else 0 for d in data]  # what a chunk of them holds (its cut)
    return members.batch("tar", path, names, data, sizes, lambda picks: [data[i] for i in picks], damage,
                         inline=True, special=special, repeats=repeats)


def read(m: Members) -> Iterator:
    """The members' bytes (or ImageError each), one at a time: read at their offsets, or carried already (a
    compressed tar)."""
    if m.inline:
        return iter(m.keys)
    return archives.read_tar_each(m.container, m.keys, m.sizes)


def read_many(path: str, wanted: Sequence[str]) -> Iterator[tuple[str, bytes | ImageError]]:
    """(row name, bytes or ImageError) of each member named in ``wanted`` (``x.png``, ``x.png::2``:
    members.Repeats), once, in archive order, then an ImageError for each name it lacks: the report draws up to
    a few thousand members again. A plain tar is indexed once and read at their offsets; a compressed one
    streamed once, up to the last of them (a stream per member made a report of a .tar.gz 18x that of the
    .tar), the members it does not want skipped unheld. ArchiveDamaged or OSError where the archive cannot be
    read (on)."""
    todo = set(wanted)
    damage = None
    if archives.archive_kind(path) != "tar":
        repeats = members.Repeats()
        for name, size, read in archives.stream_tar(path):
            content = read() if size == 0 else None  # links, devices: Skipped, with no row and no place
            if isinstance(content, archives.Skipped):
                continue
            row = repeats.one(name)
            if row in todo:
                todo.discard(row)
                yield row, read() if content is None else content
                if not todo:
                    return
    else:
        index = archives.index_tar(path)
        damage = index.damage
        for i, name in members.find(index.names, todo).items():  # one member's bytes held at a time
            yield name, archives.read_tar(path, [index.offsets[i]], [index.sizes[i]])[0]
            todo.discard(name)
    for name in sorted(todo):
        yield name, members.missing(name, damage)
