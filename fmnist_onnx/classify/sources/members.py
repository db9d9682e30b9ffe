"""What the container sources (tar, zip) share: which members are images, their rows' names (a repeated
member name told apart by its ordinal), and their true classes, from a WebDataset sidecar (``00012.cls`` beside
``00012.png``, holding the class index) or else from the ImageFolder layout inside the archive
(``Bag/00012.png``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.classify.contract import Batch, Found, Members
from fmnist_onnx.errors import UserError
from fmnist_onnx.images import ImageError
from fmnist_onnx.spec import CLASSES, NUM_CLASSES
from fmnist_onnx.text import visible

SIDECAR = ".cls"
MAX_SIDECAR_BYTES = 64  # a class index or name: anything longer is not one
REPEAT = "::"  # a repeated member name's row: the second x.png of an archive is x.png::2 (docs/sources.md)


def sample_key(name: str) -> str:
    """WebDataset's key of a member: its name up to the first dot of its base name (``a/00012.png`` ->
    ``a/00012``)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return name if dot < 0 else name[:dot]


_DIGITS = {str(i).encode(): i for i in range(NUM_CLASSES)}  # the common sidecars, looked up without parsing


def class_of_sidecar(data: bytes) -> int:
    """A ``.cls`` sidecar's class: an index 0-9, or a class name; -1 for anything else."""
    if data in _DIGITS:
        return _DIGITS[data]
    text = data[:MAX_SIDECAR_BYTES].strip().decode("utf-8", "replace")
    if text.isdigit() and int(text) < NUM_CLASSES:
        return int(text)
    return CLASSES.index(text) if text in CLASSES else -1


class Repeats:
    """The row names of one archive's members, in archive order: the first member of a name keeps it, the k-th
    (k >= 2) is ``<name>::<k>``. That is never an image's own name (an image's name ends in its image suffix,
    never in ``::`` and digits), so a row names one member and read_many finds it again. One set pass over a
    batch of names; a statement per name only in a batch that repeats one (a compressed tar's batches share
    one Repeats: a repeat may come thousands of members later)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.counts: dict[str, int] = {}  # names met more than once: how many times so far

    def name(self, names: Sequence[str]) -> Sequence[str]:
        """The row names of the next ``names``: ``names`` itself where none repeats a name met before."""
        fresh = set(names)
        if len(fresh) == len(names) and self.seen.isdisjoint(fresh):
            if self.seen:
                self.seen |= fresh
            else:
                self.seen = fresh
            return names
        return [self.one(n) for n in names]

    def one(self, name: str) -> str:
        """The row name of the next member, ``name``."""
        if name not in self.seen:
            self.seen.add(name)
            return name
        k = self.counts[name] = self.counts.get(name, 1) + 1
        return f"{name}{REPEAT}{k}"


def _samples(names: Sequence[str]) -> list[tuple[int, int]]:
    """(sample, k) of each member: its run of consecutive members with one sample key (a WebDataset sample),
    counted from 0, and which member of its name in that run it is (from 1). A compressed tar's batches are
    cut between samples, so a batch's own names tell."""
    out, run, last, counts = [], -1, None, {}
    for name in names:
        key = sample_key(name)
        if key != last:
            run, last, counts = run + 1, key, {}
        counts[name] = counts.get(name, 0) + 1
        out.append((run, counts[name]))
    return out


def split(names: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
    """Indices of the image members, of the sidecars, and of the other members (skipped), by name: the suffix
    of the base name (none where the base name starts with its only dot, ".png"). One comprehension and numpy,
    not a statement per name: a shard has tens of thousands of members, and this is the parent's own time."""
    kinds = dict.fromkeys(images.image_extensions(), 0) | {SIDECAR: 1}
    codes = np.array([kinds.get(n[dot:].lower(), 2) if (dot := n.rfind(".")) > n.rfind("/") + 1 else 2
                      for n in names], np.int8)
    pics, cls, other = (np.flatnonzero(codes == k).tolist() for k in (0, 1, 2))
    return pics, cls, other


def batch(kind: str, container: str, names: Sequence[str], keys: Sequence, sizes: Sequence[int],
          read_sidecars: Callable[[list[int]], list[bytes | Exception]], damage: str | None = None,
          inline: bool = False, special: Sequence[tuple[str, str]] = (), repeats: Repeats | None = None) -> Batch:
    """The walk's Batch of a container's members (``keys``/``sizes``: what the source reads them by), with
    an error row for the damage that ended its listing, if any. ``special``: (name, kind) of the members that
    are no file (a symlink to nothing in the archive, a device, a FIFO): skipped, and counted by kind.
    ``repeats``: the names met in the archive's earlier batches (a compressed tar's), if any."""
    pics, cls, other = split(names)
    shown = [names[i] for i in pics]
    rows = (repeats or Repeats()).name(shown)
    found = read_sidecars(cls)
    if rows is shown:  # no repeated image name (the common case): an image takes the sidecar of its sample key
        labels = {sample_key(names[i]): class_of_sidecar(data)
                  for i, data in zip(cls, found, strict=True) if isinstance(data, bytes)}
        truth = [labels.get(sample_key(n)) for n in shown]
    else:  # an image takes the sidecar of its own sample: the k-th of its name there, the k-th sidecar
        place = _samples(names)
        labels = {place[i]: class_of_sidecar(data)
                  for i, data in zip(cls, found, strict=True) if isinstance(data, bytes)}
        truth = [labels.get(place[i]) for i in pics]
    if None in truth:  # no sidecar: the ImageFolder layout inside
        truth = [_folder_class(names[i]) if t is None else t for i, t in zip(pics, truth, strict=True)]
    prefix = container + "::"
    units = [prefix + row for row in rows]
    members = Members(kind, container, units, [keys[i] for i in pics], truth,
                      [sizes[i] for i in pics] if len(sizes) else (), inline)
    broken = Found(prefix, "unlistable", damage) if damage else None
    kinds: dict[str, int] = {}
    for _, what in special:
        kinds[what] = kinds.get(what, 0) + 1
    skipped = [prefix + names[i] for i in other] + [prefix + name for name, _ in special]
    return Batch(units, skipped, broken, members, kinds or None)


def _folder_class(name: str) -> int:
    c = images.true_class(name)
    return -1 if c is None else c


def damage(e: BaseException) -> str:
    """Why an archive cannot be read (on), in words: archives.ArchiveDamaged says where; an OSError, what."""
    return f"cannot read the archive: {e.strerror or e}" if isinstance(e, OSError) else str(e)


def broken(path: str, e: BaseException) -> Batch:
    """The walk's Batch for a container that cannot be listed at all: one error row, ``<container>::``."""
    return Batch([], [], Found(path + "::", "unlistable", damage(e)))


def find(names: Sequence[str], wanted: Iterable[str]) -> dict[int, str]:
    """{position in an archive's listing ``names``: row name} for each row name of ``wanted`` that it has (a
    repeated name's k-th member: ``<name>::<k>``, members.Repeats, as the walk names it), in archive order: the
    report reads the members it draws in one pass."""
    todo = set(wanted)
    found: dict[int, str] = {}
    for i, name in enumerate(Repeats().name(names)):
        if name in todo:
            found[i] = name
            todo.discard(name)
            if not todo:
                break
    return found


def missing(member: str, damage: str | None = None) -> ImageError:
    """A member the archive does not have (as far as it could be listed: ``damage``)."""
    return ImageError(f"no member {member!r} in the archive" + (f" ({damage})" if damage else ""))


def check_files(paths: Sequence[str], what: str) -> list[str]:
    """Container inputs: each an existing regular file (or a link to one), named once; else one line."""
    seen: dict[tuple[int, int], str] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise UserError(f"{visible(p)}: cannot open the {what}: {e.strerror or e}") from None
        if not os.path.isfile(p):
            raise UserError(f"{visible(p)}: not a {what} file")
        if not os.access(p, os.R_OK):
            raise UserError(f"{visible(p)}: cannot read the {what}: permission denied")
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise UserError(f"{visible(p)} and {visible(seen[key])} are the same; name each file or folder once")
        seen[key] = p
    return list(paths)
