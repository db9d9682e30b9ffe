"""The folder source: files and folders on a local file system, walked depth first with names sorted per
folder. The unit of work is a file's path; its true class comes from the ImageFolder layout (images.true_class).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from fmnist_onnx.classify.contract import Batch, Found, Members
from fmnist_onnx.errors import UserError
from fmnist_onnx.images import image_extensions
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)


def check(paths: Sequence[str | Path]) -> list[str]:
    if not paths:
        raise UserError("no PATH given: name folders or image files to classify")
    out = []
    for p in paths:
        s = os.fspath(p)
        if not os.path.lexists(s):
            raise UserError(f"{visible(s)}: no such file or folder")
        if os.path.islink(s) and not os.path.exists(s):
            raise UserError(f"{visible(s)}: dangling symbolic link")
        out.append(s)
    # a path named twice, or one inside a folder also named, would give its files two rows. Linear in the
    # number of paths (a shell glob can name 100,000 files), times the number of folders named.
    real = [os.path.realpath(s) for s in out]
    first: dict[str, int] = {}
    for i, r in enumerate(real):
        if r in first:
            raise UserError(f"{visible(out[i])} and {visible(out[first[r]])} are the same; name each file or "
                            "folder once")
        first[r] = i
    folders = [(r.rstrip(os.sep) + os.sep, i) for i, r in enumerate(real) if os.path.isdir(r)]
    for i, r in enumerate(real):
        for prefix, j in folders:
            if r.startswith(prefix):
                raise UserError(f"{visible(out[i])} is inside {visible(out[j])}; name each file or folder once")
    return out


def walk_batches(paths: Sequence[str | Path], recursive: bool = True,
                 exclude: Iterable[str | Path] = ()) -> Iterator[Batch]:
    """Every input file under ``paths``, streamed in a deterministic order (depth first, names sorted per
    folder), a folder at a time, so memory stays flat whatever the number of files. Files named on the
    command line are always inputs; inside folders, files with an image suffix are, others are skipped.
    Symbolic links are followed (a dangling one is an input, and gets an error row); a folder reached twice
    is walked once. ``exclude``: files the walk leaves out wherever they lie in a folder (a run's own
    outputs: it never reads them back), matched by their folder's identity and their name."""
    exts = image_extensions()
    seen_dirs: set[tuple[int, int]] = set()
    left_out = _excluded(exclude)
    for arg in paths:
        p = os.fspath(arg)
        if os.path.isdir(p):
            yield from _walk(p, exts, recursive, seen_dirs, left_out)
        else:
            yield Batch([p], [])


def read(m: Members) -> list[str]:
    """What a worker decodes of loose files whose rows are escaped (sources.loose_row): their paths, read by
    images.preprocess_batch as any loose file's."""
    return list(m.keys)


def iter_files(paths: Sequence[str | Path], recursive: bool = True,
               exclude: Iterable[str | Path] = ()) -> Iterator[Found]:
    """``walk_batches`` one entry at a time: input files ('file'), skipped files ('skip'), unlistable folders."""
    for batch in walk_batches(paths, recursive, exclude):
        if batch.unlistable is not None:
            yield batch.unlistable
        for path in batch.files:
            yield Found(path, "file")
        for path in batch.skipped:
            yield Found(path, "skip")


def survey(root: str, recursive: bool, suffixes: tuple[str, ...],
           exclude: Iterable[str | Path] = ()) -> tuple[bool, bool]:
    """(an image file lies under folder ``root``, a file named with one of ``suffixes`` does), as far as the
    walk goes (``recursive``, links followed, ``exclude`` left out), in no order, stopping at the first image:
    a folder of images is told by its first entries, a folder of shards is a few names. A folder that cannot
    be listed is passed over (the walk gives it its error row)."""
    exts = image_extensions()
    left_out = _excluded(exclude)
    seen: set[tuple[int, int]] = set()
    stack, found = [root], False
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            mine = left_out.get(key, ())
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name in mine:
                        continue
                    if _is_dir(entry):
                        if recursive:
                            stack.append(entry.path)
                    elif _is_image_name(entry.name, exts):
                        return True, found
                    elif entry.name.lower().endswith(suffixes):
                        found = True
        except OSError:
            continue
    return False, found


def _excluded(paths: Iterable[str | Path]) -> dict[tuple[int, int], set[str]]:
    """{(device, inode) of a folder: names in it to leave out}. A path whose folder does not exist is in no
    folder the walk can reach."""
    out: dict[tuple[int, int], set[str]] = {}
    for p in paths:
        folder, name = os.path.split(os.fspath(p))
        try:
            st = os.stat(folder or ".")
        except OSError:
            continue
        out.setdefault((st.st_dev, st.st_ino), set()).add(name)
    return out


def _walk(root: str, exts: frozenset[str], recursive: bool, seen: set[tuple[int, int]],
          left_out: dict[tuple[int, int], set[str]]) -> Iterator[Batch]:
    """Depth first, without recursion (folders nested any depth the file system allows): a stack of the open
    folders' entries, each yielding Batches and the subfolders to go into, in name order."""
    stack = [_folder(root, exts, recursive, seen, left_out)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, Batch):
            yield item
        else:
            stack.append(_folder(item, exts, recursive, seen, left_out))


def _folder(folder: str, exts: frozenset[str], recursive: bool, seen: set[tuple[int, int]],
            left_out: dict[tuple[int, int], set[str]]) -> Iterator[Batch | str]:
    """One folder: Batches of its files, and the paths of its subfolders (str) where the walk goes in."""
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a link loop, or a folder named twice
            log.warning("%s: already walked, skipped", folder)
            return
        seen.add(key)
        names, dirs = _entries(folder)
    except OSError as e:
        yield Batch([], [], Found(folder, "unlistable", f"cannot list folder: {e.strerror or e}"))
        return
    if key in left_out:
        names = [n for n in names if n not in left_out[key]]
    prefix = folder if folder.endswith(os.sep) else folder + os.sep  # os.path.join, without a call per file
    if not dirs:  # a leaf folder (the common case): comprehensions, no Python statement per file
        images = _image_names(names, exts)
        if len(images) < len(names):
            keep = set(images)
            yield Batch([prefix + n for n in images], [prefix + n for n in names if n not in keep])
        elif images:
            yield Batch([prefix + n for n in images], [])
        return
    files: list[str] = []
    skipped: list[str] = []
    for name in names:
        if name in dirs:
            if recursive:
                if files or skipped:
                    yield Batch(files, skipped)
                    files, skipped = [], []
                yield prefix + name
            continue
        if _is_image_name(name, exts):
            files.append(prefix + name)  # also a dangling link or an unreadable file: it gets its error row
        else:
            skipped.append(prefix + name)
    if files or skipped:
        yield Batch(files, skipped)


def _entries(folder: str) -> tuple[list[str], set[str]]:
    """The names of every entry, sorted, and the set of those that are folders. Names only, read in blocks
    (not a DirEntry object per entry at once): a flat folder of a million files must fit in memory."""
    names: list[str] = []
    dirs: list[str] = []
    with os.scandir(folder) as it:
        while block := list(itertools.islice(it, 4096)):
            names += [e.name for e in block]
            try:
                dirs += [e.name for e in block if e.is_dir()]  # is_dir: free (no stat) for plain entries on Linux
            except OSError:  # an entry that cannot be stat'ed (a link into a folder we may not read): one by one
                dirs += [e.name for e in block if _is_dir(e)]
    names.sort()
    return names, set(dirs)


def _is_image_name(name: str, exts: frozenset[str]) -> bool:
    """os.path.splitext's suffix is an image suffix: from the last dot, leading dots excepted (".png" alone
    has no suffix)."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in exts and (name[0] != "." or bool(name[:dot].lstrip(".")))


def _image_names(names: list[str], exts: frozenset[str]) -> list[str]:
    """[n for n in names if _is_image_name(n, exts)], in one comprehension: a name without a dot gives its
    last character, never a suffix; names with leading dots take the whole test."""
    return [n for n in names if n[n.rfind("."):].lower() in exts and (n[0] != "." or _is_image_name(n, exts))]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; free (no stat) for plain entries on Linux
    except OSError:
        return False
