"""Tar and zip archives as sources of images, read in place: nothing is ever extracted to disk.

A plain .tar is indexed by walking its 512-byte header chain over an mmap (a few microseconds a member, where
Python's ``tarfile`` spends ~48), and members are then read with one ``pread`` each. Compressed tars (.tar.gz,
.tgz, .tar.bz2, .tar.xz) cannot be indexed without decompressing everything before a member, so they are read
in one streaming pass (``iter_tar_stream``). Zips are listed from their central directory by ``zipfile``.

Bounds: a member larger than ``images.MAX_FILE_BYTES`` is an ``ImageError`` value, never read (in a compressed
stream, where it could only be skipped by inflating it, the stream stops there: ``stream_tar``); a pax or GNU
long-name record larger than MAX_EXTENDED_BYTES is damage; a zip member that inflates past what it declares
is caught by zipfile's own size limit and CRC. Members are read one at a time (``read_tar_each``,
``read_zip_each``, ``stream_tar``'s ``read``), so a reader holds one member's bytes, not a chunk's.
A broken archive lists every member before the break and says
where it broke in one line (``ArchiveIndex.damage``); a member's own trouble is an ImageError in its place.
Member names are listed as they are (``../x``, ``/etc/x``): they are never used as paths.

Tar formats: ustar, GNU (long names 'L', base-256 numbers) and pax ('x' records: path and size; 'g' global
records ignored), as ``tarfile`` reads them: the listing is tarfile's regular members (types '0', '\\0', '7'),
names decoded as ``os.fsdecode`` does (surrogateescape), so non-UTF-8 names survive. GNU sparse members are
left out (their bytes in the archive are not the file's bytes).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import mmap
import os
import stat
import sys
import zipfile
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.images import ImageError

BLOCK = 512
MAX_EXTENDED_BYTES = 1 << 20  # a pax or GNU long-name record; real ones are a few hundred bytes
_ZERO_BLOCK = bytes(BLOCK)
_USTAR = np.frombuffer(b"ustar", np.uint8)
_WINDOW = 1 << 15  # headers checked at once: 16 MB of copied blocks
MAX_SPAN_BYTES = 64 << 20  # read_tar's one read of a chunk's members
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsdecode's
_ASCII = bytes(range(128))  # deleted by translate, what is left counts the bytes a signed checksum sees < 0
# typeflags as ints (block[156])
_REGULAR = frozenset(b"07\0")
_NO_DATA = frozenset(b"123456")  # links, devices, folders, FIFOs: tarfile skips no data after these
_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL, _SPARSE = b"LKxgS"
_EXTENSIONS = frozenset((_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL))
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
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
    (every member before the break is listed)."""

    names: list[str] = field(default_factory=list)
    offsets: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))
    damage: str | None = None


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

def _walk(read: Callable[[int, int], bytes], length: int | None, at: int = 0,
          last: str | None = None) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member, reading headers through ``read(offset, n)`` (short at
    the end). ``length``: the file's, to catch a member running past it (None for a stream: its reader checks).
    ``at``, ``last``: where to start (a header), and the member before it. Raises ArchiveDamaged where the chain
    breaks, _NotTar if the first header is no tar header."""
    long_name, pax = None, None
    while True:
        block = read(at, BLOCK)
        if len(block) < BLOCK or block == _ZERO_BLOCK:
            if at == 0 and len(block) < BLOCK:
                raise _NotTar("not a tar archive" + (" (empty file)" if not block else ""))
            if block.count(0) < len(block):
                raise _broken(f"truncated header ({len(block)} of {BLOCK} bytes)", at, last)
            return  # the end-of-archive zero block, or the end of the file after a complete member
        head = _header(block)
        if isinstance(head, str):
            raise _NotTar("not a tar archive") if at == 0 else _broken(head, at, last)
        kind, size, name = head
        data_at = at + BLOCK
        if kind in _EXTENSIONS:
            long_name, pax = _extension(read, kind, size, data_at, long_name, pax, last)
        else:
            if pax is not None:
                size, name = int(pax.get(b"size", size)), pax.get(b"path", long_name or name)
            elif long_name is not None:
                name = long_name
            sparse = kind == _SPARSE or (pax is not None and any(k.startswith(b"GNU.sparse.") for k in pax))
            long_name = pax = None
            if kind in _NO_DATA:
                size = 0
            name = name.decode(_FS_ENCODING, _FS_ERRORS)
            if length is not None and data_at + size > length:
                raise _broken(f"truncated member {name!r}", at, last,
                              f": {size} bytes declared, the file ends at byte {length}")
            if kind in _REGULAR and not sparse:
                yield name, data_at, size
                last = name
        at = data_at + -(-size // BLOCK) * BLOCK


def _extension(read, kind: int, size: int, at: int, long_name, pax, last: str | None):
    """(long_name, pax) after a GNU long-name or pax record, which names (or sizes) the next member."""
    what = "long name record" if kind in (_LONG_NAME, _LONG_LINK) else "pax record"
    if size > MAX_EXTENDED_BYTES:
        raise _broken(f"{what} of {size} bytes (limit {MAX_EXTENDED_BYTES})", at - BLOCK, last)
    data = read(at, size)
    if len(data) < size:
        raise _broken(f"truncated {what} ({len(data)} of {size} bytes)", at - BLOCK, last)
    if kind == _LONG_NAME:
        return data.split(b"\0", 1)[0], pax
    if kind == _PAX:
        fields = _pax(data)
        if fields is None or not fields.get(b"size", b"0").isdigit():
            raise _broken("bad pax record", at - BLOCK, last)
        return long_name, fields
    return long_name, pax  # a long link name, a global pax record: nothing the listing uses


# ---------------------------------------------------------------------------------------------- plain tar

def _plain_members(mm: mmap.mmap, index: ArchiveIndex, at: int = 0) -> int:
    """The common members of a shard (regular files, ustar or GNU headers with an octal size, a short name and
    a right checksum) from ``at`` on, in one tight loop, a third of _walk's cost per member; returns the offset
    of the first header that is anything else (the end, an extension, damage), where _walk goes on."""
    length = len(mm)
    names, offsets, sizes = index.names, index.offsets, index.sizes
    while at + BLOCK <= length:
        block = mm[at:at + BLOCK]
        if block[156] not in (48, 0) or block[135] or block[345] or block[257:262] != b"ustar":
            return at
        try:
            size, stored = int(block[124:135], 8), int(block[148:154], 8)
        except ValueError:
            return at
        unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) + 254
        if stored != unsigned - sum(block[148:156]) or at + BLOCK + size > length:
            return at
        nul = block.find(0, 0, 100)
        name = block[:nul] if nul >= 0 else block[:100]
        if name.endswith(b"/"):
            return at
        names.append(name.decode(_FS_ENCODING, _FS_ERRORS))
        offsets.append(at + BLOCK)
        sizes.append(size)
        at += BLOCK + -(-size // BLOCK) * BLOCK
    return at


def _octal(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values of rows of octal digits, and whether each row is digits only."""
    digits = fields.astype(np.int64) - 48
    return digits @ (8 ** np.arange(fields.shape[1] - 1, -1, -1)), ((digits >= 0) & (digits <= 7)).all(axis=1)


def _vector_members(mm: mmap.mmap, index: ArchiveIndex) -> int:
    """What _plain_members lists, from the start, with numpy: headers are found among all the file's blocks
    by their fields, checked and read in arrays, and kept while each one's size leads to the next (a member
    whose bytes look like a header breaks that chain, and the loop goes on from there). 1 us a member where
    the loop takes 3: in a shard of small images the headers are half the members and the walk is the parent's
    own cost. Returns where the loop goes on; the listing is the loop's, member for member."""
    blocks = np.frombuffer(mm, np.uint8, len(mm) // BLOCK * BLOCK).reshape(-1, BLOCK)
    try:
        return _vector_chain(blocks, len(mm), index)
    finally:
        del blocks  # the memory map cannot close while an array holds it


def _vector_chain(blocks: np.ndarray, length: int, index: ArchiveIndex) -> int:
    at = 0  # in blocks
    found = np.flatnonzero(blocks[:, 257] == ord("u"))
    for start in range(0, len(found), _WINDOW):
        where = found[start:start + _WINDOW]
        rows = blocks[where]
        kind = rows[:, 156]
        head = ((rows[:, 257:262] == _USTAR).all(axis=1) & ((kind == 48) | (kind == 0)) & (rows[:, 135] == 0)
                & (rows[:, 345] == 0))
        where, rows = where[head], rows[head]
        if not len(where) or where[0] != at:
            break
        size, digits = _octal(rows[:, 124:135])
        stored, digits_too = _octal(rows[:, 148:154])
        unsigned = rows.sum(axis=1, dtype=np.uint32) - rows[:, 148:156].sum(axis=1, dtype=np.uint32) + 256
        after = where + 1 + (size + BLOCK - 1) // BLOCK
        good = digits & digits_too & (stored == unsigned) & ((where + 1) * BLOCK + size <= length)
        chained = np.append(after[:-1] == where[1:], True)  # the last one's successor: the next window's first
        kept = good & chained
        n = len(where) if kept.all() else int(np.argmin(kept))
        n += bool(n < len(where) and good[n])  # the member is right, its successor is no plain header
        if not n:
            break
        # names: NUL-padded fields; one with bytes after a NUL, or ending in '/' (a folder), is the loop's
        text = b"\0".join(rows[:n, :100].copy().view("S100").ravel().tolist()).decode(_FS_ENCODING, _FS_ERRORS)
        names = text.split("\0")
        if len(names) != n or text.endswith("/") or "/\0" in text:
            break
        index.names.extend(names)
        index.offsets.frombytes(((where[:n] + 1) * BLOCK).astype(np.int64).tobytes())
        index.sizes.frombytes(size[:n].astype(np.int64).tobytes())
        at = int(after[n - 1])
        if n < len(where):
            break
    return at * BLOCK


def index_tar(path: str) -> ArchiveIndex:
    """The regular members of a plain tar, from its header chain (mmap); damage recorded, not raised.
    ArchiveDamaged if it is not a tar at all; OSError if it cannot be opened."""
    _check_regular(path)
    index = ArchiveIndex()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise _NotTar("not a tar archive (empty file)")
        # MAP_POPULATE: the headers are spread over the whole file; one call maps it instead of a fault a page
        populate = getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ) as mm:
            try:
                start = _plain_members(mm, index, _vector_members(mm, index))
                last = index.names[-1] if index.names else None
                for name, at, size in _walk(lambda at, n: mm[at:at + n], len(mm), start, last):
                    index.names.append(name)
                    index.offsets.append(at)
                    index.sizes.append(size)
            except _NotTar:
                raise
            except ArchiveDamaged as e:
                index.damage = str(e)
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
                ok = size <= limit and at + size <= length
                out.append(mm[at:at + size] if ok else ImageError(f"member of {size} bytes, not a sidecar"))
    return out


def _reader(fd: int, offsets: Sequence[int], sizes: Sequence[int], limit: int) -> Callable[[int, int], bytes]:
    """How read_tar reads a member: sliced from one read of the members' whole span where they lie close
    together (a chunk of a shard: its images, their headers and sidecars between them), else a pread each.
    A pread costs more than the few blocks between two members; a span is read only where it holds little else
    and at most MAX_SPAN_BYTES."""
    wanted = [(at, size) for at, size in zip(offsets, sizes, strict=True) if size <= limit]
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


def _open_decompressing(path: str):
    """The file behind a decompressor chosen by its first bytes (not its name); a plain tar as it is."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\0"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def iter_tar_stream(path: str) -> Iterator[tuple[str, bytes | ImageError]]:
    """(name, bytes or ImageError) of each regular member of a (compressed) tar in one pass (stream_tar)."""
    for name, _, read in stream_tar(path):
        yield name, read()


def stream_tar(path: str) -> Iterator[tuple[str, int, Callable[[], bytes | ImageError]]]:
    """(name, declared size, read) of each regular member of a (compressed) tar in one pass, never to disk:
    ``read()`` gives the member's bytes (or an ImageError), asked before the next member (unasked, the member
    is skipped), so that the caller decides from the declared size what to hold before reading anything.
    After the good members, ArchiveDamaged says where the archive broke (or that it is none), from here or from
    ``read()``.

    A member over images.MAX_FILE_BYTES in a compressed stream is not inflated to its declared end to be
    skipped (a 4.5 KB file may declare 4 GiB of zeros, 30 s of inflating): its ``read()`` gives its ImageError,
    then the stream stops with ArchiveDamaged naming it and where it is; the members after it are not read.
    A plain tar read as a stream skips it by seeking."""
    _check_regular(path)
    limit, last = images.MAX_FILE_BYTES, None
    with _open_decompressing(path) as f:
        stream = _Stream(f)
        try:
            for name, at, size in _walk(stream.read, None):
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
                last = name
        except _DECOMPRESS_ERRORS as e:
            raise _inflate_broken(stream, last, e) from None


_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)  # the decompressors' ways of failing


def _inflate_broken(stream: _Stream, last: str | None, e: BaseException) -> ArchiveDamaged:
    where = f"after member {last!r}" if last is not None else "before any member"
    return ArchiveDamaged(f"compressed data broken at byte {stream.pos} ({where}): {e}")


def _take(stream: _Stream, name: str, at: int, size: int, last: str | None) -> bytes | ImageError:
    """A member's bytes from the stream (stream_tar's ``read``); ArchiveDamaged where they end short."""
    try:
        data = stream.read(at, size)
    except _DECOMPRESS_ERRORS as e:
        raise _inflate_broken(stream, last, e) from None
    if len(data) < size:
        raise _broken(f"truncated member {name!r}", at - BLOCK, last,
                      f": {size} bytes declared, the data ends at byte {stream.pos}")
    return data if data else ImageError("empty member")


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
