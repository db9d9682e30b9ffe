"""Tar and zip archives as sources of images, read in place: nothing is ever extracted to disk.

A plain .tar is indexed by walking its 512-byte header chain over an mmap (about a microsecond a header, checked
in numpy arrays, where Python's ``tarfile`` spends ~48; _step, one header in Python, for the few the arrays
leave: damage, old formats, long names, links), and members are then read with one ``pread`` each. Compressed
tars (.tar.gz, .tgz, .tar.bz2, .tar.xz; .tar.zst with the [zstd] extra) cannot be indexed without decompressing
everything before a member, so they are read in one streaming pass (``iter_tar_stream``).
Zips are listed from their central directory by ``zipfile``.

Bounds: a member larger than ``images.MAX_FILE_BYTES`` is an ``ImageError`` value, never read (in a compressed
stream, where it could only be skipped by inflating it, the stream stops there: ``stream_tar``); a pax or GNU
long-name record larger than MAX_EXTENDED_BYTES is damage; a zip member that inflates past what it declares
is caught by zipfile's own size limit and CRC. Members are read one at a time (``read_tar_each``,
``read_zip_each``, ``stream_tar``'s ``read``), so a reader holds one member's bytes, not a chunk's.
A broken archive lists every member before the break and says
where it broke in one line (``ArchiveIndex.damage``); a member's own trouble is an ImageError in its place.
Member names are listed as they are (``../x``, ``/etc/x``): they are never used as paths.

Tar formats: ustar, GNU (long names 'L' and 'K', base-256 numbers) and pax ('x' and Solaris 'X' records: path,
size, linkpath; 'g' global records ignored), as ``tarfile`` reads them, whoever wrote them (tarfile, WebDataset,
GNU tar, bsdtar): the listing is tarfile's regular members (types '0', '\\0', '7') and the links that reach
one (at the target's offset), names decoded as ``os.fsdecode`` does (surrogateescape), so non-UTF-8 names
survive. Sparse members (their bytes in the archive are not the file's) and hard links to nothing are listed at
an offset < 0, an error each; symlinks out of the archive, devices and FIFOs are ``ArchiveIndex.skipped``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import mmap
import os
import posixpath
import stat
import sys
import zipfile
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.images import ImageError

BLOCK = 512
MAX_EXTENDED_BYTES = 1 << 20  # a pax or GNU long-name record; real ones are a few hundred bytes
_ZERO_BLOCK = bytes(BLOCK)
_USTAR = np.frombuffer(b"ustar", np.uint8)
_WINDOW = 1 << 15  # headers checked at once: 16 MB of copied blocks
# The blocks searched for headers at once: 128 KiB first, doubled while the chain of headers runs on into the next
# span (a shard of small members: a few searches), back to the first size after a member longer than a span (a
# tar of huge members: a span after each header, never the members' bytes). 16 MiB and more: 64 of them.
_SPANS = (256, 1 << 15)
_POPULATE_BYTES = 64 << 20  # a tar up to this size is mapped whole at once (its headers lie on every page)
MAX_SPAN_BYTES = 64 << 20  # read_tar's one read of a chunk's members
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsdecode's
_ASCII = bytes(range(128))  # deleted by translate, what is left counts the bytes a signed checksum sees < 0
# typeflags as ints (block[156])
_REGULAR = frozenset(b"07\0")
_NO_DATA = frozenset(b"123456")  # links, devices, folders, FIFOs: tarfile skips no data after these
_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL, _PAX_SOLARIS, _SPARSE = b"LKxgXS"
_EXTENSIONS = frozenset((_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL, _PAX_SOLARIS))
_FILE, _HARD_LINK, _FOLDER = b"015"
_LINKS = frozenset(b"12")
_SKIPPED_KINDS = {ord("2"): "symlink", ord("3"): "device", ord("4"): "device", ord("6"): "FIFO"}  # else "other"
# offsets < 0 in a tar's index: members listed whose bytes are not read (an error row each, read_tar's)
SPARSE, LOST_LINK = -1, -2
UNREADABLE = {SPARSE: "sparse member: not read (its bytes in the archive are not the file's)",
              LOST_LINK: "hard link to a member the archive does not hold before it"}
ZSTD_SUFFIXES = (".tar.zst", ".tzst")  # read through the zstandard package, the [zstd] extra
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", *ZSTD_SUFFIXES)
TAR_SUFFIXES = (".tar", *COMPRESSED_TAR_SUFFIXES)  # the names read as tars, by classify too
# how zipfile says a central directory is broken (a flagged UTF-8 name that is not: UnicodeDecodeError)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError)
_PIECE = 1 << 20  # a big zip member is inflated this much at a time (_read_pieces)
_ZIP_CACHE: dict[tuple, zipfile.ZipFile] = {}  # read_zip's open archives, see _open_zip


class ArchiveDamaged(Exception):
    """An archive that is not one at all, or (from the stream API) one that broke partway: one line saying where."""


class _NotTar(ArchiveDamaged):
    pass


@dataclass
class ArchiveIndex:
    """The regular members of an archive, in archive order. ``offsets``: where each member's data starts in
    the file (tar), or its index in ``ZipFile.infolist()`` (zip). ``damage``: None, or where the archive broke
    (every member before the break is listed). ``skipped``: members that get no row, and what they are
    ("symlink" out of the archive, "device", "FIFO", "other")."""

    names: list[str] = field(default_factory=list)
    offsets: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))
    damage: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, kind): members without a row


def archive_kind(path: str) -> str | None:
    """'tar', 'tgz' (any compressed tar), 'zip' by the name's suffix (any case), else None."""
    name = os.fspath(path).lower()
    if name.endswith(".tar"):
        return "tar"
    if name.endswith(COMPRESSED_TAR_SUFFIXES):
        return "tgz"
    if name.endswith(".zip"):
        return "zip"
    return None


def _check_regular(path: str) -> None:
    # a FIFO named x.tar must not hang the run, nor a folder give an odd error
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ArchiveDamaged("not a regular file")


# ---------------------------------------------------------------------------------------------- tar headers

def _number(field: bytes) -> int | None:
    """A tar number field as tarfile reads it: octal (NUL or space ended) or GNU base-256; None if neither."""
    if field[0] in (0x80, 0xFF):  # base-256, big-endian, 0xFF: negative
        n = int.from_bytes(field[1:], "big")
        return n if field[0] == 0x80 else n - 256 ** (len(field) - 1)
    try:
        return int(field.rstrip(b" \0") or b"0", 8)
    except ValueError:  # text after a NUL: the field ends at the first one
        pass
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None


def _field(block: bytes, start: int, end: int) -> int | None:
    """The number field block[start:end]; the common case first: octal digits ended by a NUL in the last
    byte (tar and tarfile write sizes so) or the one before (checksums), which int() reads alike."""
    nul = end - 1 if block[end - 1] == 0 else end - 2 if block[end - 2] == 0 else 0
    if nul:
        try:
            return int(block[start:nul], 8)
        except ValueError:  # base-256, a NUL further in, ...: the field read the general way
            pass
    return _number(block[start:end])


def _checksum_ok(block: bytes) -> bool:
    """tar's header checksum, unsigned or signed (old tars summed signed chars), with the field as spaces."""
    stored = _field(block, 148, 156)
    # adler32's low half is 1 + the byte sum mod 65521; a 256-byte half sums to at most 65280, so it is exact
    unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    unsigned += 256 - sum(block[148:156])
    if stored == unsigned:
        return True
    high = len(block[:148].translate(None, _ASCII)) + len(block[156:].translate(None, _ASCII))
    return stored == unsigned - 256 * high


def _header(block: bytes) -> tuple[int, int, bytes] | str:
    """(typeflag, size, name) of one header block, or what is wrong with it."""
    if not _checksum_ok(block):
        return "bad header checksum"
    size = _field(block, 124, 136)
    if size is None or size < 0:
        return "bad size field"
    name = block[:100].split(b"\0", 1)[0]
    kind = block[156]
    if kind == 0 and name.endswith(b"/"):
        kind = ord("5")  # the old V7 way of writing a folder
    if block[257:263] == b"ustar\0" and block[345] and kind not in (_LONG_NAME, _LONG_LINK, _SPARSE):
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name  # POSIX ustar: names up to 256 bytes
    return kind, size, name


def _pax(data: bytes) -> dict[bytes, bytes] | None:
    """The records of a pax header ('%d %s=%s\\n', the length counting the whole record), or None if broken."""
    fields, pos = {}, 0
    while pos < len(data) and data[pos]:
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            return None
        end = pos + int(data[pos:space])
        if end > len(data) or end <= space + 2 or data[end - 1] != 0x0A:
            return None
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            return None
        fields[key] = value
        pos = end
    return fields


def _broken(what: str, at: int, last: str | None, detail: str = "") -> ArchiveDamaged:
    where = f"after member {last!r}" if last is not None else "before any member"
    return ArchiveDamaged(f"{what} at byte {at} ({where}){detail}")


# ---------------------------------------------------------------------------------------------- the walk

@dataclass
class _Pending:
    """What extension records said about the next member: a GNU long name ('L') or link name ('K'), a pax
    record ('x'). Reset by the member they name."""

    name: bytes | None = None
    link: bytes | None = None
    pax: dict[bytes, bytes] | None = None


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _next_block(read: Callable[[int, int], bytes], at: int, last: str | None) -> bytes | None:
    """The header block at ``at``, or None at the end of the archive (a zero block, or the end of the file after
    a complete member). Raises where a header is cut short, _NotTar where the file has no first header."""
    block = read(at, BLOCK)
    if len(block) == BLOCK and block != _ZERO_BLOCK:
        return block
    if at == 0 and len(block) < BLOCK:
        raise _NotTar("not a tar archive" + (" (empty file)" if not block else ""))
    if block.count(0) < len(block):
        raise _broken(f"truncated header ({len(block)} of {BLOCK} bytes)", at, last)
    return None


def _step(read: Callable[[int, int], bytes], length: int | None, at: int, block: bytes, pend: _Pending,
          last: str | None) -> tuple[tuple | None, int]:
    """One header (``block``, at byte ``at``): (the member it is, or None for an extension record; where the next
    header is). A member is (name, data offset, size, kind, link target): kind '0' for every regular member, 'S'
    for a sparse one (GNU 'S', or pax GNU.sparse records), '5' for a folder, else the header's own typeflag; the
    link target (text) for '1' and '2' only."""
    head = _header(block)
    if isinstance(head, str):
        raise _NotTar("not a tar archive") if at == 0 else _broken(head, at, last)
    kind, size, name = head
    data_at = at + BLOCK
    if kind in _EXTENSIONS:
        _extension(read, kind, size, data_at, pend, last)
        return None, data_at + _padded(size)
    if kind == _SPARSE and block[482]:  # old GNU sparse: more of its map in blocks before the data
        data_at = _sparse_map(read, data_at, last)
    link, pax = block[157:257].split(b"\0", 1)[0], pend.pax
    if pend.name is not None:
        name = pend.name
    if pend.link is not None:
        link = pend.link
    if pax is not None:
        size, name, link = int(pax.get(b"size", size)), pax.get(b"path", name), pax.get(b"linkpath", link)
        if any(k.startswith(b"GNU.sparse.") for k in pax):
            kind, name = _SPARSE, pax.get(b"GNU.sparse.name", name)
    pend.name = pend.link = pend.pax = None
    if kind in _NO_DATA:
        size = 0
    text = name.decode(_FS_ENCODING, _FS_ERRORS)
    if length is not None and data_at + size > length:
        raise _broken(f"truncated member {text!r}", at, last,
                      f": {size} bytes declared, the file ends at byte {length}")
    kind = _FILE if kind in _REGULAR else kind
    return (text, data_at, size, kind, link.decode(_FS_ENCODING, _FS_ERRORS) if kind in _LINKS else None), \
        data_at + _padded(size)


def _sparse_map(read: Callable[[int, int], bytes], at: int, last: str | None) -> int:
    """Where an old GNU sparse member's data starts: after the blocks that go on with its map (byte 504 of each
    says whether another follows), as tarfile reads them."""
    for _ in range(MAX_EXTENDED_BYTES // BLOCK):
        block = read(at, BLOCK)
        if len(block) < BLOCK:
            raise _broken("truncated sparse map", at, last)
        at += BLOCK
        if not block[504]:
            return at
    raise _broken(f"sparse map of more than {MAX_EXTENDED_BYTES} bytes", at, last)


def _walk(read: Callable[[int, int], bytes], length: int | None, at: int = 0,
          last: str | None = None) -> Iterator[tuple]:
    """Each member (_step's tuple, and where the next header is), reading headers through ``read(offset, n)``
    (short at the end). ``length``: the file's, to catch a member running past it (None for a stream: its reader
    checks). ``at``, ``last``: where to start (a header), and the member before it. Raises ArchiveDamaged where
    the chain breaks, _NotTar if the first header is no tar header."""
    pend = _Pending()
    while (block := _next_block(read, at, last)) is not None:
        member, at = _step(read, length, at, block, pend, last)
        if member is not None:
            yield *member, at
            last = member[0]


def _extension(read, kind: int, size: int, at: int, pend: _Pending, last: str | None) -> None:
    """A GNU long-name or pax record, which names (or sizes) the next member, read into ``pend``. A global pax
    record ('g') names no member: ignored, as is any key but path, size, linkpath and GNU.sparse.* (hdrcharset
    needs nothing: names are decoded as os.fsdecode does, UTF-8 or not)."""
    what = "long name record" if kind in (_LONG_NAME, _LONG_LINK) else "pax record"
    if kind == _PAX_GLOBAL:
        return
    if size > MAX_EXTENDED_BYTES:
        raise _broken(f"{what} of {size} bytes (limit {MAX_EXTENDED_BYTES})", at - BLOCK, last)
    data = read(at, size)
    if len(data) < size:
        raise _broken(f"truncated {what} ({len(data)} of {size} bytes)", at - BLOCK, last)
    if kind == _LONG_NAME:
        pend.name = data.split(b"\0", 1)[0]
    elif kind == _LONG_LINK:
        pend.link = data.split(b"\0", 1)[0]
    else:
        fields = _pax(data)
        if fields is None or not fields.get(b"size", b"0").isdigit():
            raise _broken("bad pax record", at - BLOCK, last)
        pend.pax = fields if pend.pax is None else pend.pax | fields


# ---------------------------------------------------------------------------------------------- plain tar

def _kinds(flags: bytes) -> np.ndarray:
    table = np.zeros(256, bool)
    table[list(flags)] = True
    return table


_FAST_KINDS = _kinds(b"01234567xXgLK")  # the typeflags the fast walk takes ('S' and the rest: _step)
_DATA_KINDS = ~_kinds(_NO_DATA)
_FILE_KINDS = _kinds(b"07")
_SPECIAL_KINDS = _kinds(b"12346LK")  # links, devices, FIFOs, long names: each read by _step
_PAX_KINDS = _kinds(b"xX")
_EXTENSION_KINDS = _kinds(b"xXLK")
_NAMING_KEYS = (b" path=", b" linkpath=", b" hdrcharset=")  # a pax record that names its member: _step reads it
_SIZING_KEYS = (b" size=", b" GNU.sparse")  # ... that sizes it: the fast walk stops there, _step goes on


def _octal(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values of rows of octal digits, and whether each row is digits only. A float64 product (BLAS), 5x
    an int64 one: 12 digits are under 2**36, every partial sum an exact integer."""
    digits = fields - np.uint8(48)  # a byte below '0' wraps past 7
    value = digits.astype(np.float64) @ (8.0 ** np.arange(fields.shape[1] - 1, -1, -1))
    return value.astype(np.int64), (digits <= 7).all(axis=1)


@dataclass
class _Candidates:
    """The blocks of a plain tar that may be headers ("ustar" at byte 257), checked in arrays: where they are
    (block numbers), their typeflags and sizes, whether the fast walk takes one (a right checksum, octal
    numbers, its data inside the file, a kind it knows), whether _step must read it (``special``), and the
    candidate its size leads to (``nxt``, -1 where that is none the fast walk takes). ``breaks``: the candidates
    whose next is not the one after them (a chain's ends, and headers inside a member's data jumped over)."""

    where: np.ndarray
    kind: np.ndarray
    size: np.ndarray
    ok: np.ndarray
    special: np.ndarray
    after: np.ndarray
    nxt: np.ndarray
    breaks: np.ndarray
    names: list[str]  # the name field of each candidate that is a regular file the fast walk takes, in order
    name_at: np.ndarray  # where each candidate's is in ``names`` (-1: none)


def _candidates(blocks: np.ndarray, length: int, lo: int = 0, hi: int | None = None) -> _Candidates:
    """The candidates among blocks lo..hi (their members' data may run past hi)."""
    found = lo + np.flatnonzero(blocks[lo:hi, 257] == ord("u"))
    parts = [_check(blocks, found[s:s + _WINDOW], length) for s in range(0, len(found), _WINDOW)] or \
        [_check(blocks, found, length)]
    kind, size, ok, special, named = (np.concatenate(p) for p in zip(*[p[:5] for p in parts], strict=True))
    names = [name for p in parts for name in p[5]] if len(parts) > 1 else parts[0][5]
    name_at = np.where(named, np.cumsum(named) - 1, -1)
    after = found + 1 + (np.where(_DATA_KINDS[kind], size, 0) + BLOCK - 1) // BLOCK
    n = len(found)
    at = np.minimum(np.searchsorted(found, after), max(n - 1, 0))
    nxt = np.where(ok & (found[at] == after) & ok[at], at, -1) if n else at
    breaks = np.flatnonzero(nxt != np.arange(1, n + 1))
    return _Candidates(found, kind, size, ok, special, after, nxt, breaks, names, name_at)


def _check(blocks: np.ndarray, where: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
    """_Candidates' kind, size, ok and special of the blocks ``where`` (a window of them: their copies are
    512 bytes each), which are regular files the fast walk takes, and their names."""
    rows = blocks[where]
    kind = rows[:, 156]
    size, digits = _octal(rows[:, 124:135])
    stored, digits_too = _octal(rows[:, 148:154])
    unsigned = rows.sum(axis=1, dtype=np.uint32) - rows[:, 148:156].sum(axis=1, dtype=np.uint32) + 256
    end = (where + 1) * BLOCK + np.where(_DATA_KINDS[kind], size, 0)
    ok = ((rows[:, 257:262] == _USTAR).all(axis=1) & digits & digits_too & (stored == unsigned)
          & ((rows[:, 135] == 0) | (rows[:, 135] == 32)) & _FAST_KINDS[kind] & (end <= length))
    # a POSIX ustar name in two fields (prefix, name), as GNU tar --format=posix and bsdtar write long ones
    special = _SPECIAL_KINDS[kind] | (_FILE_KINDS[kind] & (rows[:, 262] == 0) & (rows[:, 345] != 0))
    pax = np.flatnonzero(ok & _PAX_KINDS[kind])
    if len(pax):
        ok[pax[size[pax] > BLOCK]] = False  # a long record (a name of hundreds of bytes): _step reads it alone
        pax = pax[size[pax] <= BLOCK]
        names, sizes = _pax_hits(blocks, where[pax], size[pax])
        special[pax[names]] = True
        ok[pax[sizes]] = False
    named = ok & _FILE_KINDS[kind] & ~special
    return kind, size, ok, special, named, _names(rows[named, :100])


def _pax_hits(blocks: np.ndarray, where: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which one-block pax records (headers at blocks ``where``) hold a key that names their member, and which
    one that sizes it: one search over their texts side by side, not a parse each (WebDataset's TarWriter and
    tarfile.add write one before every member, for a fractional mtime alone)."""
    width = max(int(size.max()), 1) if len(size) else 1
    # a key past a record's end (in its block's padding, NULs from every writer) is only a needless _step
    blob = blocks[np.minimum(where + 1, len(blocks) - 1), :width].tobytes()
    hits = []
    for keys in (_NAMING_KEYS, _SIZING_KEYS):
        found = np.zeros(len(where), bool)
        for key in keys:
            at = blob.find(key)
            while at >= 0:
                found[at // width] = True
                at = blob.find(key, at + 1)
        hits.append(found)
    return hits[0], hits[1] | (where + 1 >= len(blocks))


class _Lister:
    """index_tar's walk: the fast walk over _Candidates as far as it takes the chain, _step for the headers it
    leaves (damage, old formats, 'S', pax records that size a member), then the fast walk again."""

    def __init__(self, mm: mmap.mmap, index: ArchiveIndex) -> None:
        self.mm, self.index, self.length = mm, index, len(mm)
        self.pend, self.last = _Pending(), None
        self.links: list[tuple[int, int, str]] = []  # (position in the index, '1' or '2', target)

    def read(self, at: int, n: int) -> bytes:
        return self.mm[at:at + n]

    def walk(self) -> None:
        blocks = np.frombuffer(self.mm, np.uint8, self.length // BLOCK * BLOCK).reshape(-1, BLOCK)
        try:
            at, lo, hi, span = 0, 0, 0, _SPANS[0] // 2
            while True:
                if not lo <= at // BLOCK < hi:  # a span from this header on (_SPANS)
                    span = min(2 * span, _SPANS[1]) if at // BLOCK < hi + span else _SPANS[0]
                    lo, hi = at // BLOCK, at // BLOCK + span
                    self.prefetch(lo * BLOCK, hi * BLOCK)
                    c = _candidates(blocks, self.length, lo, hi)
                went, at = at, self.fast(blocks, c, at)
                if at != went and not lo <= at // BLOCK < hi:
                    continue  # the chain ran past the span: the next span's fast walk goes on from there
                while True:  # one member through _step, with the extension records before it
                    block = _next_block(self.read, at, self.last)
                    if block is None:
                        return
                    member, at = _step(self.read, self.length, at, block, self.pend, self.last)
                    if member is not None:
                        self.add(member)
                        break
        finally:
            del blocks  # the memory map cannot close while an array holds it

    def prefetch(self, start: int, end: int) -> None:
        """Ask the kernel to read bytes start..end ahead (one request, not a fault a page) where not mapped whole."""
        start -= start % mmap.PAGESIZE
        if start < self.length:
            self.mm.madvise(mmap.MADV_WILLNEED, start, min(end, self.length) - start)

    def add(self, member: tuple) -> None:
        name, at, size, kind = member[:4]
        index = self.index
        if kind in _LINKS:
            self.links.append((len(index.names), kind, member[4]))
            at, size = LOST_LINK, 0
        elif kind == _SPARSE:
            at = SPARSE
        elif kind != _FILE:
            if kind != _FOLDER:
                index.skipped.append((name, _SKIPPED_KINDS.get(kind, "other")))
            return
        index.names.append(name)
        index.offsets.append(at)
        index.sizes.append(size)
        self.last = name

    def fast(self, blocks: np.ndarray, c: _Candidates, at: int) -> int:
        """The chain from the header at byte ``at`` as far as the fast walk takes it; where _step goes on."""
        i = int(np.searchsorted(c.where, at // BLOCK))
        if at % BLOCK or i == len(c.where) or c.where[i] * BLOCK != at or not c.ok[i]:
            return at
        while True:
            j = int(c.breaks[np.searchsorted(c.breaks, i)])
            self.take(blocks, c, i, j + 1)
            if c.nxt[j] < 0:
                return int(c.after[j]) * BLOCK
            i = int(c.nxt[j])

    def take(self, blocks: np.ndarray, c: _Candidates, i: int, stop: int) -> None:
        """Candidates i..stop, a chain: regular members in arrays, a folder or an uneventful pax record
        dropped, the rest through _step in order."""
        kind, special = c.kind[i:stop], c.special[i:stop].copy()
        special[0] |= self.pend != _Pending()  # named by a record before this chain
        follow = special & _EXTENSION_KINDS[kind]
        while follow.any():  # the member after a long name or a naming pax record takes it: _step reads it
            follow = np.append(False, follow[:-1]) & ~special
            special |= follow
            follow &= _PAX_KINDS[kind]  # ... and after a pax record between them, the one after that
        files = np.flatnonzero(_FILE_KINDS[kind] & ~special)
        where = c.where[i + files]
        at = c.name_at[i + files]
        if len(at) and at[-1] - at[0] == len(at) - 1:  # the common case: one run of the names
            names = c.names[int(at[0]):int(at[-1]) + 1]
        else:
            names = [c.names[k] for k in at.tolist()]
        offsets = ((where + 1) * BLOCK).astype(np.int64)
        sizes = c.size[i + files].astype(np.int64)
        done = 0
        for s, upto in zip(np.flatnonzero(special).tolist(), np.searchsorted(files, np.flatnonzero(special)).tolist(),
                           strict=True):
            self.extend(names, offsets, sizes, done, upto)
            done, at = upto, int(c.where[i + s]) * BLOCK
            member, _ = _step(self.read, self.length, at, self.read(at, BLOCK), self.pend, self.last)
            if member is not None:
                self.add(member)
        self.extend(names, offsets, sizes, done, len(files))

    def extend(self, names: list[str], offsets: np.ndarray, sizes: np.ndarray, start: int, stop: int) -> None:
        if stop > start:
            self.index.names.extend(names[start:stop])
            self.index.offsets.frombytes(offsets[start:stop].tobytes())
            self.index.sizes.frombytes(sizes[start:stop].tobytes())
            self.last = names[stop - 1]


def _names(fields: np.ndarray) -> list[str]:
    """The names in rows of NUL-padded 100-byte fields, decoded in one piece; one with bytes after a NUL (the
    name ends at the first), one at a time."""
    if not len(fields):
        return []
    text = b"\0".join(fields.copy().view("S100").ravel().tolist()).decode(_FS_ENCODING, _FS_ERRORS)
    names = text.split("\0")
    if len(names) != len(fields):
        names = [bytes(f).split(b"\0", 1)[0].decode(_FS_ENCODING, _FS_ERRORS) for f in fields]
    return names


def _resolve_links(index: ArchiveIndex, links: list[tuple[int, int, str]]) -> None:
    """A link member reads its target's bytes: a hard link the last member of its target's name before it, a
    symbolic link the member its target names (relative to the link's folder), links to links followed. A
    symbolic link to nothing in the archive (outside it, a folder, a loop) has no row, a skipped member; a hard
    link to nothing keeps its row, an error (its file's bytes are not in the archive)."""
    if not links:
        return
    names, offsets, sizes = index.names, index.offsets, index.sizes
    positions = {name: i for i, name in enumerate(names)}
    normal: dict[str, int] = {}

    def find(target: str, before: int | None) -> int | None:
        i = positions.get(target)
        if i is None:
            if not normal:
                normal.update((posixpath.normpath(n), i) for i, n in enumerate(names))
            i = normal.get(posixpath.normpath(target))
        if i is not None and before is not None and i >= before:
            want = posixpath.normpath(target)
            i = next((k for k in range(before - 1, -1, -1) if posixpath.normpath(names[k]) == want), None)
        return i

    waiting = {pos: (kind, target if kind == _HARD_LINK else posixpath.join(posixpath.dirname(names[pos]), target))
               for pos, kind, target in links}
    for _ in range(8):  # a link to a link is resolved once its target is; a loop never is
        for pos, (kind, target) in list(waiting.items()):
            if target is None:
                continue
            i = find(target, pos if kind == _HARD_LINK else None)
            if i is None or i == pos:
                waiting[pos] = (kind, None)
            elif i not in waiting:
                offsets[pos], sizes[pos] = offsets[i], sizes[i]
                del waiting[pos]
        if not any(target is not None for _, target in waiting.values()):
            break
    lost = sorted(pos for pos, (kind, _) in waiting.items() if kind != _HARD_LINK)
    if lost:
        index.skipped.extend((names[pos], "symlink") for pos in lost)
        keep = sorted(set(range(len(names))) - set(lost))
        index.names = [names[k] for k in keep]
        index.offsets, index.sizes = array("q", (offsets[k] for k in keep)), array("q", (sizes[k] for k in keep))


def index_tar(path: str) -> ArchiveIndex:
    """The members of a plain tar, from its header chain (mmap); damage recorded, not raised. Regular files and
    links to one (at their target's offset), sparse files and hard links to nothing at an offset < 0 (an error
    row: UNREADABLE); symbolic links out of the archive, devices and FIFOs in ``skipped``; folders nowhere.
    ArchiveDamaged if it is not a tar at all; OSError if it cannot be opened."""
    _check_regular(path)
    index = ArchiveIndex()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise _NotTar("not a tar archive (empty file)")
        # MAP_POPULATE: in a shard the headers lie on every page; one call maps it instead of a fault a page. Not
        # for a bigger file, whose members may be most of it: the walk reads the spans it searches, no more.
        small = os.fstat(f.fileno()).st_size <= _POPULATE_BYTES
        populate = getattr(mmap, "MAP_POPULATE", 0) if small else 0
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ) as mm:
            lister = _Lister(mm, index)
            try:
                lister.walk()
            except _NotTar:
                raise
            except ArchiveDamaged as e:
                index.damage = str(e)
    _resolve_links(index, lister.links)
    return index


def _too_large(size: int, limit: int) -> ImageError:
    return ImageError(f"member too large ({size} bytes, limit {limit})")


def read_small(path: str, offsets: Sequence[int], sizes: Sequence[int], limit: int = 64) -> list[bytes | ImageError]:
    """Small members (sidecars: a class index) of a plain tar, sliced from one memory map instead of a pread
    each; a member over ``limit`` bytes, or past the end, is an ImageError."""
    out: list[bytes | ImageError] = []
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size
        if not length or not offsets:
            return [ImageError("empty member")] * len(offsets)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for at, size in zip(offsets, sizes, strict=True):
                ok = size <= limit and 0 <= at and at + size <= length
                out.append(mm[at:at + size] if ok else ImageError(f"member of {size} bytes, not a sidecar"))
    return out


def _reader(fd: int, offsets: Sequence[int], sizes: Sequence[int], limit: int) -> Callable[[int, int], bytes]:
    """How read_tar reads a member: sliced from one read of the members' whole span where they lie close
    together (a chunk of a shard: its images, their headers and sidecars between them), else a pread each.
    A pread costs more than the few blocks between two members; a span is read only where it holds little else
    and at most MAX_SPAN_BYTES."""
    wanted = [(at, size) for at, size in zip(offsets, sizes, strict=True) if size <= limit and at >= 0]
    if len(wanted) > 1:
        lo, hi = min(at for at, _ in wanted), max(at + size for at, size in wanted)
        if hi - lo <= min(MAX_SPAN_BYTES, sum(size for _, size in wanted) + 4 * BLOCK * len(wanted)):
            try:
                span = os.pread(fd, hi - lo, lo)
            except OSError:  # each member read alone, each its own error
                pass
            else:
                return lambda at, size: span[at - lo:at - lo + size]
    return lambda at, size: os.pread(fd, size, at)


def read_tar(path: str, offsets: Sequence[int], sizes: Sequence[int]) -> list[bytes | ImageError]:
    """The bytes of members (from index_tar), read at their offsets (_reader); an ImageError in the place of one
    that is too large, empty, cut short by the end of the file or unreadable."""
    return list(read_tar_each(path, offsets, sizes))


def read_tar_each(path: str, offsets: Sequence[int], sizes: Sequence[int]) -> Iterator[bytes | ImageError]:
    """read_tar's members one at a time, as they are asked for: a worker holds one member's bytes while it
    decodes it, not a chunk's (beside the span _reader reads at once, at most MAX_SPAN_BYTES)."""
    limit = images.MAX_FILE_BYTES
    try:
        _check_regular(path)
        fd = os.open(path, os.O_RDONLY)
    except (OSError, ArchiveDamaged) as e:
        for _ in offsets:
            yield ImageError(f"cannot open the archive: {getattr(e, 'strerror', None) or e}")
        return
    try:
        read = _reader(fd, offsets, sizes, limit)
        for at, size in zip(offsets, sizes, strict=True):
            if at < 0:
                yield ImageError(UNREADABLE.get(at, "not read"))
                continue
            if size > limit:
                yield _too_large(size, limit)
                continue
            try:
                data = read(at, size)
            except OSError as e:
                yield ImageError(f"cannot read: {e.strerror or e}")
                continue
            if len(data) < size:
                yield ImageError(f"truncated member ({len(data)} of {size} bytes in the file)")
            else:
                yield data if data else ImageError("empty member")
            del data  # not held while the next member is read
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- compressed tar

class _Stream:
    """A decompressing file read front to back: ``read(at, n)`` first discards whatever lies before ``at``."""

    def __init__(self, f):
        self.f, self.pos = f, 0
        # a plain tar read as a stream skips a large member by seeking, knowing the file's size
        self.size = os.fstat(f.fileno()).st_size if isinstance(f, io.BufferedReader) else None

    def skip(self, n: int) -> int:
        """Discard n bytes (in bounded pieces); how many there were."""
        if self.size is not None:
            done = max(0, min(n, self.size - self.pos))
            self.f.seek(done, io.SEEK_CUR)
            self.pos += done
            return done
        done = 0
        while done < n:
            chunk = self.f.read(min(n - done, 1 << 20))
            if not chunk:
                break
            done += len(chunk)
        self.pos += done
        return done

    def read(self, at: int, n: int) -> bytes:
        if at > self.pos and self.skip(at - self.pos) < at - self.pos:
            return b""
        chunks = []
        while n:
            chunk = self.f.read(n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        data = b"".join(chunks)
        self.pos += len(data)
        return data


ZSTD_MISSING = "a .tar.zst needs the zstandard package: pip install 'fmnist-onnx[zstd]'"


def zstd_missing() -> bool:
    """Whether the zstandard package (the [zstd] extra) cannot be imported."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return True
    return False


def _stream_errors() -> tuple[type[BaseException], ...]:
    """The decompressors' ways of failing (zstandard's where it is loaded)."""
    zstd = sys.modules.get("zstandard")
    return (OSError, EOFError, zlib.error, lzma.LZMAError, *((zstd.ZstdError,) if zstd else ()))


class _Zstd:
    """A .tar.zst decompressed, frame after frame, ``read(n)`` at most n bytes; EOFError at the end where the
    file ends inside a frame (zstandard's reader would just stop: a cut archive must not look whole)."""

    def __init__(self, path: str) -> None:
        import zstandard

        self.whole = _zstd_frames_whole(path)
        self.reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                 closefd=True)

    def read(self, n: int) -> bytes:
        data = self.reader.read(n)
        if not data and n and not self.whole:
            raise EOFError("the file ends inside a zstd frame")
        return data

    def __enter__(self) -> _Zstd:
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()


def _zstd_frames_whole(path: str) -> bool:
    """Whether the file is whole zstd frames (or skippable frames): each frame's header and block headers
    walked to its last block (RFC 8878), a few bytes read per 128 KiB block, nothing decompressed."""
    with open(path, "rb") as f:
        size, at = os.fstat(f.fileno()).st_size, 0
        while at < size:
            head = os.pread(f.fileno(), 14, at)
            if len(head) < 8:
                return False
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: its size, then its bytes
                at += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != 0xFD2FB528:
                return False
            fhd = head[4]
            single = fhd >> 5 & 1
            at += 5 + (not single) + (0, 1, 2, 4)[fhd & 3] + ((1 if single else 0), 2, 4, 8)[fhd >> 6]
            while True:
                block = os.pread(f.fileno(), 3, at)
                if len(block) < 3:
                    return False
                value = int.from_bytes(block, "little")
                kind, length = value >> 1 & 3, value >> 3
                if kind == 3:
                    return False
                at += 3 + (1 if kind == 1 else length)
                if value & 1:
                    break
            at += 4 * (fhd >> 2 & 1)  # the content checksum
        return at == size


def _open_decompressing(path: str):
    """The file behind a decompressor chosen by its first bytes (not its name); a plain tar as it is."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x28\xb5\x2f\xfd"):  # zstd: one frame, or several (zstd -T, or files concatenated)
        if zstd_missing():
            raise ArchiveDamaged(ZSTD_MISSING)
        return _Zstd(path)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\0"):
        return lzma.open(path, "rb")
    return open(path, "rb")


class Skipped(NamedTuple):
    """In iter_tar_stream's place of a member's bytes: a member that gets no row, and what it is (index_tar's
    ``skipped`` kinds)."""

    kind: str


def iter_tar_stream(path: str) -> Iterator[tuple[str, bytes | ImageError | Skipped]]:
    """(name, bytes, ImageError or Skipped) of each member of a (compressed) tar in one pass (stream_tar)."""
    for name, _, read in stream_tar(path):
        yield name, read()


def stream_tar(path: str) -> Iterator[tuple[str, int, Callable[[], bytes | ImageError | Skipped]]]:
    """(name, declared size, read) of each member of a (compressed) tar in one pass, never to disk: ``read()``
    gives the member's bytes (or an ImageError), asked before the next member (unasked, the member is skipped),
    so that the caller decides from the declared size what to hold before reading anything; for a member that
    gets no row it gives Skipped. A link's target has streamed past (a compressed tar is read once): a hard
    link, and a symbolic link to a member before it, are errors; a symbolic link to none before it is skipped.
    After the good members, ArchiveDamaged says where the archive broke (or that it is none), from here or from
    ``read()``.

    A member over images.MAX_FILE_BYTES in a compressed stream is not inflated to its declared end to be
    skipped (a 4.5 KB file may declare 4 GiB of zeros, 30 s of inflating): its ``read()`` gives its ImageError,
    then the stream stops with ArchiveDamaged naming it and where it is; the members after it are not read.
    A plain tar read as a stream skips it by seeking."""
    _check_regular(path)
    limit, last, seen = images.MAX_FILE_BYTES, None, set()
    with _open_decompressing(path) as f:
        stream = _Stream(f)
        try:
            for name, at, size, kind, link, _ in _walk(stream.read, None):
                if kind != _FILE:
                    if kind != _FOLDER:
                        found = _unstreamed(name, kind, link, seen)
                        yield name, 0, lambda found=found: found
                    last = name
                    continue
                if size > limit:
                    yield name, size, lambda size=size: _too_large(size, limit)
                    if stream.size is None:
                        raise _broken(f"member {name!r} of {size} bytes (limit {limit}) not inflated", at - BLOCK,
                                      last, ": the members after it are not read")
                    if stream.skip(size) < size:
                        raise _broken(f"truncated member {name!r}", at - BLOCK, last,
                                      f": {size} bytes declared, the data ends at byte {stream.pos}")
                else:
                    yield name, size, lambda name=name, at=at, size=size, last=last: _take(stream, name, at, size,
                                                                                           last)
                seen.add(posixpath.normpath(name))
                last = name
        except _stream_errors() as e:
            raise _inflate_broken(stream, last, e) from None


def _inflate_broken(stream: _Stream, last: str | None, e: BaseException) -> ArchiveDamaged:
    where = f"after member {last!r}" if last is not None else "before any member"
    return ArchiveDamaged(f"compressed data broken at byte {stream.pos} ({where}): {e}")


def _take(stream: _Stream, name: str, at: int, size: int, last: str | None) -> bytes | ImageError:
    """A member's bytes from the stream (stream_tar's ``read``); ArchiveDamaged where they end short."""
    try:
        data = stream.read(at, size)
    except _stream_errors() as e:
        raise _inflate_broken(stream, last, e) from None
    if len(data) < size:
        raise _broken(f"truncated member {name!r}", at - BLOCK, last,
                      f": {size} bytes declared, the data ends at byte {stream.pos}")
    return data if data else ImageError("empty member")


def _unstreamed(name: str, kind: int, link: str | None, seen: set[str]) -> ImageError | Skipped:
    """What a compressed tar's member that is no regular file gives: an error, or Skipped."""
    if kind == _SPARSE:
        return ImageError(UNREADABLE[SPARSE])
    if kind not in _LINKS:
        return Skipped(_SKIPPED_KINDS.get(kind, "other"))
    target = posixpath.normpath(link if kind == _HARD_LINK else posixpath.join(posixpath.dirname(name), link))
    if kind == _HARD_LINK or target in seen:
        return ImageError(f"link to {link!r}, not read: in a compressed tar its target has streamed past "
                          "(a plain .tar reads it)")
    return Skipped("symlink")


# ---------------------------------------------------------------------------------------------- zip

def _zip_name(info: zipfile.ZipInfo) -> str:
    """zipfile decodes names without the UTF-8 flag as cp437; many writers (Info-ZIP on Linux, Python before
    3.x, ...) put UTF-8 there without the flag, so that is tried first."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _zip_regular(info: zipfile.ZipInfo) -> bool:
    if info.is_dir():
        return False
    mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix, which keeps st_mode there
    return not mode or stat.S_ISREG(mode) or not stat.S_IFMT(mode)


def _zip_infos(path: str) -> list[zipfile.ZipInfo]:
    _check_regular(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.infolist()
    except _ZIP_ERRORS as e:
        raise ArchiveDamaged(f"not a zip archive: {e}") from None


def index_zip(path: str) -> ArchiveIndex:
    """The regular members of a zip (folders and links left out) from its central directory. ArchiveDamaged
    if it is no zip (a zip cut short loses its central directory, so there is no partial listing)."""
    index = ArchiveIndex()
    for i, info in enumerate(_zip_infos(path)):
        if _zip_regular(info):
            index.names.append(_zip_name(info))
            index.offsets.append(i)
            index.sizes.append(info.file_size)
    return index


def _open_zip(path: str) -> zipfile.ZipFile:
    """An open ZipFile for ``path``, kept for the next call: parsing a 100,000-member central directory costs
    ~0.3 s, too much for every chunk. Keyed by the process (a forked child must not share the parent's file
    offset) and by the file's identity (a replaced archive is read afresh)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveDamaged("not a regular file")
    key = (os.getpid(), path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    zf = _ZIP_CACHE.get(key)
    if zf is None:
        while len(_ZIP_CACHE) >= 4:
            _ZIP_CACHE.pop(next(iter(_ZIP_CACHE))).close()
        zf = _ZIP_CACHE[key] = zipfile.ZipFile(path)
    return zf


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes | ImageError:
    if info.flag_bits & 0x1:
        return ImageError("encrypted member")
    if info.file_size > limit:
        return _too_large(info.file_size, limit)
    try:
        with zf.open(info) as f:
            # zipfile stops at the declared size and checks the CRC there; asking for more than that would have
            # it inflate up to what was asked (a 1000-byte liar inflating 256 MB into memory)
            data = f.read(info.file_size + 1) if info.file_size < _PIECE else _read_pieces(f, info.file_size + 1)
    except NotImplementedError:
        return ImageError(f"unsupported compression method {info.compress_type}")
    except Exception as e:  # zipfile and its decompressors fail in many types; each is a value here
        return ImageError(f"cannot read member: {e}")
    if len(data) > limit:
        return ImageError(f"member too large (more than {limit} bytes)")
    if len(data) != info.file_size:
        return ImageError(f"member size mismatch ({len(data)} bytes, {info.file_size} declared)")
    return data if data else ImageError("empty member")


def _read_pieces(f, n: int) -> bytes:
    """Up to ``n`` bytes of ``f``, inflated _PIECE at a time into one growing buffer: zlib's output for one
    read of them all is gathered in blocks, then joined (the member held twice, 500 MB for a 250 MB one)."""
    out = io.BytesIO()
    while n > 0:
        piece = f.read(min(n, _PIECE))
        if not piece:
            break
        out.write(piece)
        n -= len(piece)
    return out.getvalue()  # the buffer itself, not a copy (BytesIO shrinks it to its size)


def read_zip(path: str, indices: Sequence[int]) -> list[bytes | ImageError]:
    """The bytes of members by their index in ``ZipFile.infolist()`` (index_zip's offsets); an ImageError in
    the place of one that is too large, encrypted, compressed in a way zipfile lacks, or fails its CRC."""
    return list(read_zip_each(path, indices))


def read_zip_each(path: str, indices: Sequence[int]) -> Iterator[bytes | ImageError]:
    """read_zip's members one at a time, as they are asked for: a worker holds one member's bytes while it
    decodes it. Several central records may name one compressed block (Python's zipfile before 3.12 accepts
    overlapping entries): each is inflated, one at a time, never past its declared size nor the limit."""
    try:
        zf = _open_zip(path)
    except (OSError, ArchiveDamaged, *_ZIP_ERRORS) as e:
        for _ in indices:
            yield ImageError(f"cannot open the archive: {getattr(e, 'strerror', None) or e}")
        return
    infos = zf.infolist()
    for i in indices:
        yield _zip_member(zf, infos[i], images.MAX_FILE_BYTES)
