"""The tar source: tar archives (the WebDataset layout of shards, or any tar of images), read in place, never
unpacked to disk. A plain ``.tar`` is indexed by walking its 512-byte headers over a memory map (archives.py:
4 us a member, where Python's tarfile takes 48) and the workers read each image at its offset; a compressed
tar (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) cannot be read at an offset, so it is streamed once here
and its images' bytes go to the workers. A damaged archive gives every member before the damage its row, then
one error row, ``<archive>::``, saying where it broke."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from fmnist_onnx import archives
from fmnist_onnx.classify.contract import Batch, Members
from fmnist_onnx.classify.sources import members
from fmnist_onnx.images import ImageError

log = logging.getLogger(__name__)

STREAM_BATCH = 2048  # members of a compressed tar held at once (their bytes are in memory until decoded)


def check(paths: Sequence[str]) -> list[str]:
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

    return members.batch("tar", path, index.names, index.offsets, index.sizes, sidecars, index.damage)


def _streamed(path: str) -> Iterator[Batch]:
    """A compressed tar in one pass, a few thousand members at a time, cut between samples (an image and its
    sidecar stay together)."""
    names: list[str] = []
    data: list = []
    try:
        for name, content in archives.iter_tar_stream(path):
            if len(names) >= STREAM_BATCH and members.sample_key(name) != members.sample_key(names[-1]):
                yield _inline(path, names, data)
                names, data = [], []
            names.append(name)
            data.append(content)
    except (archives.ArchiveDamaged, OSError) as e:
        yield _inline(path, names, data, members.damage(e))
        return
    if names:
        yield _inline(path, names, data)


def _inline(path: str, names: list[str], data: list, damage: str | None = None) -> Batch:
    return members.batch("tar", path, names, data, (), lambda picks: [data[i] for i in picks], damage, inline=True)


def read(m: Members) -> list:
    """The members' bytes (or ImageError each): read at their offsets, or carried already (a compressed tar)."""
    if m.inline:
        return list(m.keys)
    return archives.read_tar(m.container, m.keys, m.sizes)


def read_many(path: str, wanted: Sequence[str]) -> Iterator[tuple[str, bytes | ImageError]]:
    """(name, bytes or ImageError) of each member named in ``wanted``, once, in archive order, then an ImageError
    for each name it lacks: the report draws up to a few thousand members again. A plain tar is indexed once and
    read at their offsets; a compressed one streamed once, up to the last of them (a stream per member made a
    report of a .tar.gz 18x that of the .tar). ArchiveDamaged or OSError where the archive cannot be read (on)."""
    todo = set(wanted)
    damage = None
    if archives.archive_kind(path) != "tar":
        for name, content in archives.iter_tar_stream(path):
            if name in todo:
                todo.discard(name)
                yield name, content
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
