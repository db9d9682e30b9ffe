"""The zip source: zip archives of images, read in place through their central directory, never unpacked to
disk. Each worker opens the archive once and inflates its members, bounded (archives.read_zip: a member that
inflates past images.MAX_FILE_BYTES, or lies about its size, is an error row, not a full memory)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fmnist_onnx import archives
from fmnist_onnx.classify.contract import Batch, Members
from fmnist_onnx.classify.sources import members
from fmnist_onnx.images import ImageError


def check(paths: Sequence[str]) -> list[str]:
    return members.check_files(paths, "zip archive")


def walk_batches(paths: Sequence[str], recursive: bool = True, exclude: Sequence[str] = ()) -> Iterator[Batch]:
    for path in paths:
        try:
            index = archives.index_zip(path)
        except (archives.ArchiveDamaged, OSError) as e:
            yield members.broken(path, e)
            continue

        def sidecars(picks: list[int], path: str = path, index=index) -> list:
            return archives.read_zip(path, [index.offsets[i] for i in picks])

        # the declared sizes cut the chunks: a member is never inflated past its own
        yield members.batch("zip", path, index.names, index.offsets, index.sizes, sidecars, index.damage)


def read(m: Members) -> Iterator:
    """The members' bytes (or ImageError each), inflated one at a time."""
    return archives.read_zip_each(m.container, m.keys)


def read_many(path: str, wanted: Sequence[str]) -> Iterator[tuple[str, bytes | ImageError]]:
    """(name, bytes or ImageError) of each member named in ``wanted``, once, in archive order, then an ImageError
    for each name it lacks: the report's draws from one zip, its central directory listed once for all of them.
    ArchiveDamaged or OSError where it is no zip."""
    index = archives.index_zip(path)
    found = members.find(index.names, wanted)
    for i, name in found.items():
        yield name, archives.read_zip(path, [index.offsets[i]])[0]
    for name in sorted(set(wanted) - set(found.values())):
        yield name, members.missing(name)
