"""Image files -> the model's input: find files, read, decode, preprocess. Defined once, used by classify
(local worker processes) and the Ray engine alike. No torch here; numpy and Pillow only (pyspng if present).

The preprocessing, for any image Pillow opens:
1. Decode to 8-bit grayscale. Palette and RGB(A) images go through RGB; transparency is composited onto
   white (a cut-out product photo is then a garment on white, like the photos Fashion-MNIST was made from).
   16-bit grayscale is scaled (v >> 8), never clipped as Pillow's ``convert("L")`` does. The image is turned
   upright as its EXIF orientation tag says, as ``ImageOps.exif_transpose`` does (a photo taken sideways is
   classified upright; nothing is done where the tag is absent or 1).
2. A 28x28 image is used as it is. Any other size: crop to the object (pixels that differ from the border
   colour), pad to a square with the border colour (aspect ratio kept), resize to 28x28 (Lanczos, after a
   first reduction by whole blocks as Pillow's ``reducing_gap=3`` does). The padded square is only ever made
   at that reduced size (at most 168 pixels a side), so a file costs its own pixels: a 1 x 64,000,000 PNG
   does not become a 64,000,000-pixel square.
3. ``invert="auto"``: an image whose border is light (mean over the outermost pixels above 127.5) is a dark
   object on a light background, like a product photo, and is inverted to Fashion-MNIST's light-on-dark.
4. Scale to float32 in [0, 1] (x / 255), as torchvision's ToTensor does in training.

Errors are values: every function that takes one file gives its error as a short string, so one broken
file never ends a million-file run. Bounds: MAX_PIXELS (64,000,000: more is refused as a possible
decompression bomb, before decoding) and MAX_FILE_BYTES, so one image's memory is bounded too: measured, at
most 0.6 GB (a 64 Mpx RGBA PNG of random pixels, 256 MB on disk; 0.35 GB for a compressible one). Decoders'
warnings (Python's, and libtiff's own writes to stderr) go to the debug log with the file's name. The
libspng fast path only takes PNGs that Pillow reads the same way: results never depend on pyspng.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import secrets
import stat
import struct
import sys
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fmnist_onnx.spec import (
    CLASSES,
    IMAGE_SIZE,
    class_folder_name,
)

log = logging.getLogger(__name__)

# Bounds on what one file may cost: a decompression bomb (a small file that decodes to gigapixels) or a
# huge file is an error row, not an out-of-memory kill. 64 Mpx covers 48 Mpx phone photos.
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 256 << 20
# Pillow formats that it can name but not decode here (stubs, or external programs such as Ghostscript).
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS"}
_CLASS_INDEX = {class_folder_name(c): i for i, c in enumerate(CLASSES)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

try:  # libspng decodes a small PNG ~4x faster than Pillow; the result is identical (PNG is lossless)
    import pyspng
except ImportError:  # optional: Pillow handles every format on its own
    pyspng = None


class ImageError(Exception):
    """A file that cannot become a model input; the message is what the output's error column says."""


def _pil():
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS != MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check, with our limit
    return Image


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes ('.png', ...) of the formats Pillow can open and decode here."""
    Image = _pil()
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in _UNDECODABLE)


def true_class(path: str) -> int | None:
    """The class of a file in the ImageFolder layout: the nearest enclosing folder named after a class
    ('/' written as '-'), or None."""
    parts = path.replace(os.sep, "/").split("/")[:-1]
    for name in reversed(parts):
        if name in _CLASS_INDEX:
            return _CLASS_INDEX[name]
    return None


# ---------------------------------------------------------------------------------------------- reading

def read_file(path: str | Path) -> bytes:
    """The bytes of one file, or ImageError naming why not (missing, dangling link, permission, too big)."""
    try:
        # O_NONBLOCK: opening a named pipe must not hang a worker until someone writes to it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError("dangling symbolic link") from None
        raise ImageError("file not found") from None
    except OSError as e:
        raise ImageError(f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a folder")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"file too large ({st.st_size} bytes, limit {MAX_FILE_BYTES})")
        want = st.st_size + 1  # +1: one call reads the whole file, and sees one that grew meanwhile
        chunks, total = [], 0
        while total <= MAX_FILE_BYTES:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if len(chunk) < want:  # a short read of a regular file is its end
                break
            want = 1 << 20
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"file too large (more than {MAX_FILE_BYTES} bytes)")
    if not data:
        raise ImageError("empty file")
    return data


# ---------------------------------------------------------------------------------------------- decoding

# Chunks the libspng path may pass over: they change no pixel of an 8-bit grayscale image, and Pillow neither
# decompresses them nor rejects them. Anything else (text, iCCP, eXIf, tRNS, PLTE, a private chunk) goes to
# Pillow, which decides: the result must not depend on whether pyspng is installed.
_PLAIN_PNG_CHUNKS = frozenset({b"IDAT", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"sBIT", b"tIME"})
_IHDR_13 = b"\0\0\0\x0dIHDR"
_CHUNK_HEAD = struct.Struct(">I4s")  # a PNG chunk's length and type
_U32 = struct.Struct(">I")
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic TIFF and BigTIFF, both byte orders
# to name the format in an error where Pillow failed before it could
_SIGNATURES = ((_PNG_SIGNATURE, "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
               *((magic, "TIFF") for magic in _TIFF_MAGIC))
# Pillow's codec status codes (ImageFile.ERRORS), in words a user can act on.
_DECODER_ERRORS = {
    -1: "the image data is damaged (it holds more data than the image)",
    -2: "the image data is damaged or uses an unsupported compression",
    -3: "the image data is damaged (not what its header announces)",
    -8: "the file uses options this decoder does not support",
    -9: "not enough memory to decode it",
}
_DECODER_ERROR = re.compile(r"(?:decoder|decoding) error (-?\d+)")
# Pillow's own messages for those codes (Image.core.getcodecstatus), as most plugins word them
_CODEC_STATUS = {"buffer overrun": -1, "broken data stream": -2, "unrecognized data stream contents": -3,
                 "codec configuration error": -8, "out of memory": -9}
# EXIF orientation (tag 0x0112) -> how to turn the decoded pixels upright, as ImageOps.exif_transpose does
_ORIENT = {
    2: lambda a: a[:, ::-1],         # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],      # ROTATE_180
    4: lambda a: a[::-1],            # FLIP_TOP_BOTTOM
    5: lambda a: a.T,                # TRANSPOSE
    6: lambda a: np.rot90(a, -1),    # ROTATE_270 (counter-clockwise): a quarter turn clockwise
    7: lambda a: a[::-1, ::-1].T,    # TRANSVERSE
    8: lambda a: np.rot90(a, 1),     # ROTATE_90 (counter-clockwise)
}
_TILE_PIXELS = 1 << 20  # big images become grayscale a tile at a time: the conversion's own memory stays small


def _plain_png(data: bytes) -> bool:
    """A PNG that Pillow reads as libspng does: IHDR, then only the chunks above up to IEND, and a valid CRC
    on every chunk, IDAT and IEND included. Pillow checks the CRCs before the first IDAT and leans on zlib for
    the image data; libspng lets a damaged IDAT through with wrong pixels (one bit flipped: 144 of 300 files
    where Pillow says the data is damaged). Any bad CRC sends the file to Pillow, which decides (0.3 us a file)."""
    pos, end = 8, len(data)
    while pos + 12 <= end:
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        stop = pos + 8 + length
        if stop + 4 > end:
            return False
        if kind not in _PLAIN_PNG_CHUNKS and kind != b"IEND" and not (kind == b"IHDR" and pos == 8):
            return False
        if zlib.crc32(data[pos + 4:stop]) != _U32.unpack_from(data, stop)[0]:
            return False
        if kind == b"IEND":
            return True
        pos = stop + 4
    return False


def _fast_png(data: bytes) -> np.ndarray | None:
    """8-bit grayscale PNG without transparency through libspng, or None (then Pillow decodes it)."""
    if pyspng is None or len(data) < 45 or not data.startswith(_PNG_SIGNATURE) or data[8:16] != _IHDR_13:
        return None
    width, height, depth, color = struct.unpack_from(">IIBB", data, 16)
    if depth != 8 or color != 0 or width * height > MAX_PIXELS or not _plain_png(data):
        return None
    try:
        a = pyspng.load(data)
    except Exception:  # noqa: BLE001 - any libspng failure: Pillow decides, and words the error
        return None
    if a.dtype != np.uint8 or a.shape != (height, width):
        return None
    return a


def _too_large(what: str) -> ImageError:
    return ImageError(f"image too large: {what} (limit {MAX_PIXELS:,} pixels: a possible decompression bomb)")


def _gray_tile(im) -> np.ndarray:
    """A loaded Pillow image of any mode as 8-bit grayscale [h, w]."""
    Image = _pil()
    mode = im.mode
    if mode in ("1", "L") and "transparency" not in im.info:
        return np.asarray(im.convert("L") if mode == "1" else im)
    if mode.startswith("I;16"):
        # 16-bit grayscale: keep the high byte. Pillow's convert("L") would clip everything above 255.
        return (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        return (np.clip(np.asarray(im), 0, 65535) >> 8).astype(np.uint8)
    if mode == "F":
        return np.clip(np.asarray(im), 0, 255).astype(np.uint8)
    if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV: through RGB, so that "L" means the same everywhere
    return np.asarray(im.convert("L"))


def _to_gray(im) -> np.ndarray:
    """A loaded Pillow image of any mode as 8-bit grayscale [h, w]. Every step is per pixel, so a big image is
    converted a tile at a time: compositing a 64 Mpx RGBA image whole would cost four more copies of 256 MB."""
    w, h = im.size
    if w * h <= _TILE_PIXELS:
        return _gray_tile(im)
    tile_w = min(w, _TILE_PIXELS)
    tile_h = max(1, _TILE_PIXELS // tile_w)
    out = np.empty((h, w), np.uint8)
    for y in range(0, h, tile_h):
        for x in range(0, w, tile_w):
            box = (x, y, min(w, x + tile_w), min(h, y + tile_h))
            out[box[1]:box[3], box[0]:box[2]] = _gray_tile(im.crop(box))
    return out


def _upright(im, gray: np.ndarray, name: str | Path) -> np.ndarray:
    """``gray`` turned as the image's EXIF orientation says (a photo taken sideways is classified upright)."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001 - damaged EXIF data: the pixels decoded, use them as they are
        log.debug("%s: unreadable EXIF data, orientation ignored: %r", name, e)
        return gray
    turn = _ORIENT.get(orientation) if isinstance(orientation, int) else None
    return gray if turn is None else np.ascontiguousarray(turn(gray))


def _decode_error(e: Exception, data: bytes, fmt: str | None) -> ImageError:
    """Pillow's exception as one line a user can act on, naming the format (Pillow's, or the file's signature
    where Pillow failed before naming it)."""
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    code = _DECODER_ERROR.search(msg)
    status = next((c for words, c in _CODEC_STATUS.items() if msg.startswith(words)), None)
    if code or status is not None:
        n = int(code.group(1)) if code else status
        msg = f"{_DECODER_ERRORS.get(n, 'the image data cannot be decoded')} (decoder error {n})"
    elif msg == "Truncated File Read":
        msg = "the file is truncated"
    elif msg.startswith("image file is truncated"):  # " (N bytes not processed)" may follow
        msg = "the file is truncated" + msg[len("image file is truncated"):]
    fmt = fmt or _signature(data)
    return ImageError(f"cannot decode{f' {fmt}' if fmt else ''}: {msg[:200]}")


def _signature(data: bytes) -> str | None:
    """The format a file's first bytes announce (the common ones), or None."""
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


@contextmanager
def _stderr_to_log(name: str | Path) -> Iterator[None]:
    """libtiff writes its warnings to the process's stderr itself (C code, fd 2), naming no file: while a TIFF
    is decoded, fd 2 is a pipe, and what came through is logged at debug level with the file's name. The pipe
    does not block: past its 64 KiB buffer, more warnings are dropped rather than stall the decoder."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (closed): nothing to keep clean
        yield
        return
    try:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):  # no pipe2 (not Linux), or out of file descriptors: leave stderr be
        os.close(saved)
        yield
        return
    if sys.stderr is not None:
        sys.stderr.flush()  # what Python wrote before goes to the real stderr
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        chunks = []
        while True:
            try:
                chunk = os.read(read_end, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            if line.strip():
                log.debug("%s: %s", name, line.strip())


def decode_gray(data: bytes, name: str | Path = "image") -> np.ndarray:
    """Encoded image bytes -> 8-bit grayscale [h, w] (first frame of an animation), upright as its EXIF
    orientation says, or ImageError. ``name`` (the file's path) labels the decoder's warnings in the debug log."""
    if not data:
        raise ImageError("empty file")
    fast = _fast_png(data)
    if fast is not None:
        return fast
    if data[:4] in _TIFF_MAGIC:
        with _stderr_to_log(name):
            return _decode_pillow(data, name)
    return _decode_pillow(data, name)


def _decode_pillow(data: bytes, name: str | Path) -> np.ndarray:
    Image = _pil()
    from PIL import UnidentifiedImageError

    fmt = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every decoder warning is recorded, then logged with the file's name
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            width, height = im.size
            if width * height > MAX_PIXELS:  # from the header, before decoding anything
                raise _too_large(f"{width}x{height} = {width * height:,} pixels")
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})")
            if im.format == "JPEG" and min(width, height) > 4 * IMAGE_SIZE:
                im.draft("RGB", (4 * IMAGE_SIZE, 4 * IMAGE_SIZE))  # decode a big JPEG at 1/2..1/8 scale
            im.load()
            return _upright(im, _to_gray(im), name)
        except ImageError:
            raise
        except UnidentifiedImageError:
            fmt = _signature(data)  # a PNG whose header checksum is wrong is not "not an image"
            raise ImageError(f"cannot decode {fmt}: its header is damaged" if fmt else
                             "not an image (or a format Pillow cannot read)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow words it with its own threshold (twice the limit for the error): say ours, once
            pixels = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_large(f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels") from None
        except MemoryError:
            raise ImageError("image too large to decode (out of memory)") from None
        except Exception as e:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error...
            raise _decode_error(e, data, fmt) from None
        finally:
            for w in caught:
                log.debug("%s: %s: %s", name, w.category.__name__, w.message)


# ---------------------------------------------------------------------------------------------- preprocessing

# A pixel belongs to the object when it differs from the background colour by more than this.
_OBJECT_CONTRAST = 24
# As Pillow's resize(reducing_gap=3): average f x f blocks first, f = the largest with the result >= 3 x 28
_REDUCING_GAP = 3


def _border(a: np.ndarray) -> np.ndarray:
    """The outermost pixels of a 2-D image, as one flat array."""
    if a.shape[0] <= 2 or a.shape[1] <= 2:
        return a.ravel()
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _light_border(border: np.ndarray) -> bool:
    """A mean border value above 127.5 (exact integer arithmetic, same in the batch path)."""
    return 2 * int(border.sum(dtype=np.int64)) > 255 * border.size


def _crop_to_object(gray: np.ndarray, background: int) -> np.ndarray:
    """The smallest rectangle holding every pixel that differs clearly from the background (a view), or all.
    Fashion-MNIST's garments fill the frame, so a photo's garment must too. Memory: two masks of the image."""
    mask = gray < background - _OBJECT_CONTRAST
    mask |= gray > background + _OBJECT_CONTRAST
    rows = mask.any(1)
    if not rows.any():
        return gray
    r0, r1 = _span(rows)
    c0, c1 = _span(mask[r0:r1].any(0))
    return gray[r0:r1, c0:c1]


def _span(flags: np.ndarray) -> tuple[int, int]:
    """The first True of a 1-D bool array that has one, and one past its last."""
    return int(flags.argmax()), len(flags) - int(flags[::-1].argmax())


def _block_means(gray: np.ndarray, background: int, side: int, f: int) -> np.ndarray:
    """The side x side square that holds ``gray`` centred on ``background``, averaged over f x f blocks (the
    last row and column of blocks are cut by the square's edge) and rounded as Pillow's Image.reduce rounds:
    uint8 [ceil(side / f)] * 2. Computed from ``gray``'s own pixels: the square itself is never built (a 1 x
    64,000,000 image would make it 64,000,000 x 64,000,000), and a block with no object pixel is the background."""
    h, w = gray.shape
    top, left = (side - h) // 2, (side - w) // 2
    n = -(-side // f)
    edges = np.minimum(np.arange(n + 1, dtype=np.int64) * f, side)
    sizes = np.diff(edges)
    r0, r1 = top // f, (top + h - 1) // f + 1  # the blocks that hold object pixels
    c0, c1 = left // f, (left + w - 1) // f + 1
    rows = np.maximum(edges[r0:r1] - top, 0)  # where each of those blocks starts, in the object's coordinates
    cols = np.maximum(edges[c0:c1] - left, 0)
    # Sum along the longer side first (a loop over at most 6 x 28 blocks; np.add.reduceat is 10x slower on uint8),
    # so that the partial sums stay small: blocks x shorter side. uint32 holds them: 255 x f < 2^32.
    a, starts, across = (gray, rows, cols) if h >= w else (gray.T, cols, rows)
    stops = np.append(starts[1:], len(a))
    part = np.stack([a[i:j].sum(axis=0, dtype=np.uint32) for i, j in zip(starts, stops, strict=True)])
    sums = np.add.reduceat(part, across, axis=1, dtype=np.int64)
    if h < w:
        sums = sums.T
    area = sizes[r0:r1, None] * sizes[None, c0:c1]
    inside = np.diff(rows, append=h)[:, None] * np.diff(cols, append=w)[None, :]  # object pixels per block
    total = sums + background * (area - inside)
    # Rounded as Pillow's ImagingReduce* rounds, ((sum + area / 2) * multiplier) >> 24 with multiplier = 2^32 /
    # (256 area) in float32 (so that results are Pillow's, to the bit), where that fits in 32 bits: blocks under
    # 4,096 pixels a side. Bigger ones (a square over 344,064 pixels a side) are rounded exactly.
    mean = (total + area // 2) // area
    small = area < 1 << 24
    multiplier = (np.float32(2**32) / (256 * np.where(small, area, 1)).astype(np.float32)).astype(np.int64)
    out = np.full((n, n), background, np.uint8)
    out[r0:r1, c0:c1] = np.where(small, ((total + area // 2) * multiplier) >> 24, mean)
    return out


def fit_square(gray: np.ndarray, background: int) -> np.ndarray:
    """Any size -> 28x28: crop to the object, pad to a square with ``background``, resize (Lanczos, after a
    first reduction by whole blocks as Pillow's ``reducing_gap=3`` does). The cost is the object's pixels,
    read about twice; the padded square is only ever built at its reduced size (at most 6 x 28 a side)."""
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return gray
    Image = _pil()
    gray = _crop_to_object(gray, background)
    side = max(gray.shape)
    f = max(1, side // (_REDUCING_GAP * IMAGE_SIZE))
    small = Image.fromarray(_block_means(gray, background, side, f))
    # the box: the square's extent in reduced pixels (its last block may be partial), as Pillow's resize passes it
    return np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, box=(0, 0, side / f, side / f)))


def preprocess_gray(gray: np.ndarray, invert: str = "auto") -> np.ndarray:
    """8-bit grayscale of any size -> uint8 [28, 28] in Fashion-MNIST's polarity (see the module doc)."""
    border = _border(gray)
    flip = invert == "yes" or (invert == "auto" and _light_border(border))
    try:
        out = fit_square(gray, int(np.median(border)) if gray.shape != (IMAGE_SIZE, IMAGE_SIZE) else 0)
    except MemoryError:
        raise ImageError("image too large to preprocess (out of memory)") from None
    return 255 - out if flip else out


def load_bytes(data: bytes, invert: str = "auto", name: str | Path = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 [28, 28], or ImageError."""
    return preprocess_gray(decode_gray(data, name), invert)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], exactly as ToTensor scales in training."""
    x = images.astype(np.float32)
    x /= 255.0
    return x.reshape(len(images), 1, IMAGE_SIZE, IMAGE_SIZE)


def preprocess(source: bytes | str | Path, invert: str = "auto") -> tuple[np.ndarray | None, str]:
    """One image (its bytes, or a path) -> (float32 [1, 28, 28], "") or (None, error message)."""
    try:
        if isinstance(source, bytes | bytearray):
            data, name = bytes(source), "image"
        else:
            data, name = read_file(source), source
        return to_model_input(load_bytes(data, invert, name)[None])[0], ""
    except ImageError as e:
        return None, str(e)


def preprocess_batch(sources: Iterable[bytes | str | Path | ImageError], invert: str = "auto",
                     count: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Many images (bytes, paths, or the ImageError of one that could not be read) -> (uint8 [N, 28, 28],
    errors): errors[i] is "" where image i is good,
    else its message (and image i is zeros). Same result as ``preprocess`` image by image, faster: the
    common case (a 28x28 8-bit grayscale PNG) skips the per-image numpy work, and the invert decision
    is taken for all such images at once. uint8, not float32, to ship 4x fewer bytes between processes.
    ``count``: how many ``sources`` gives, taken as they come (an archive's members read one at a time: one
    member's bytes held, not a chunk's); None: all listed first."""
    if count is None:
        sources = list(sources)
        count = len(sources)
    out = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors = [""] * count
    plain = []  # 28x28 images whose invert decision is still to take
    i = -1
    for i, src in enumerate(sources):
        try:
            if isinstance(src, ImageError):  # a source could not read this image: its error row
                raise src
            if isinstance(src, bytes | bytearray):
                gray = decode_gray(bytes(src), f"image {i}")
            else:
                gray = decode_gray(read_file(src), src)
            if gray.shape == (IMAGE_SIZE, IMAGE_SIZE) and invert == "auto":
                out[i] = gray
                plain.append(i)
            else:
                out[i] = preprocess_gray(gray, invert)
        except ImageError as e:
            errors[i] = str(e)
        src = gray = None  # neither held while the next one is read
    for short in range(i + 1, count):  # a source that gave fewer: never a row of zeros classified
        errors[short] = "not read (its source gave no bytes for it)"
    if plain:
        idx = np.asarray(plain)
        sums = out[idx][:, _BORDER_MASK].sum(axis=1, dtype=np.int64)
        flip = idx[2 * sums > 255 * _BORDER_SIZE]
        out[flip] = 255 - out[flip]
    return out, errors


_BORDER_MASK = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
_BORDER_MASK[[0, -1], :] = True
_BORDER_MASK[:, [0, -1]] = True
_BORDER_SIZE = int(_BORDER_MASK.sum())


# ---------------------------------------------------------------------------------------------- export

def export_png(pixels: np.ndarray, labels: Sequence[int], out: str | Path, overwrite: bool = False,
               progress: bool = False) -> int:
    """Write uint8 images [N, 28, 28] as ``out/<class folder>/<index>.png`` (the ImageFolder layout), each file
    written under a new temporary name and renamed: a link planted in ``out``, as a class folder or a file, is
    refused or replaced, never followed. Returns the number of files written."""
    out = Path(out)
    if os.path.islink(out) or (out.exists() and not out.is_dir()):
        raise ImageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ImageError(f"{out} is not empty; choose another --out, or --overwrite to write into it")
    out.mkdir(parents=True, exist_ok=True)
    folders = _class_folders(out)
    try:
        _write_pngs(pixels, labels, folders, progress)
    finally:
        for fd in folders:
            os.close(fd)
    return len(pixels)


def _class_folders(out: Path) -> list[int]:
    """A descriptor on each class folder in ``out`` (made where missing), opened without following links."""
    fds: list[int] = []
    try:
        base = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name in CLASSES:
                folder = class_folder_name(name)
                try:
                    os.mkdir(folder, dir_fd=base)
                except FileExistsError:
                    pass
                fds.append(os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base))
        finally:
            os.close(base)
    except OSError as e:
        for fd in fds:
            os.close(fd)
        why = "a symbolic link or not a folder" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
        raise ImageError(f"cannot write into {out}: {e.filename or out} is {why}") from None
    return fds


def encode_png(img: np.ndarray, buf: io.BytesIO | None = None) -> bytes:
    """A uint8 [28, 28] image as the PNG bytes every export writes (Pillow, mode L, its default settings).
    ``buf``: a buffer to reuse, emptied first."""
    buf = buf if buf is not None else io.BytesIO()
    buf.seek(0)
    buf.truncate()
    _pil().fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG")  # 2-D uint8: mode L
    return buf.getvalue()


def png_name(index: int, count: int) -> str:
    """The file name of image ``index`` of ``count`` in every export: its index, 5 digits or more."""
    return f"{index:0{max(5, len(str(count - 1)))}d}.png"


def _write_pngs(pixels: np.ndarray, labels: Sequence[int], folders: list[int], progress: bool) -> None:
    from fmnist_onnx.progress import bar as progress_bar

    bar = progress_bar("export-png", enabled=progress, total=len(pixels), unit="img", noun="images")
    buf = io.BytesIO()
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        png = encode_png(img, buf)
        name, dfd = png_name(i, len(pixels)), folders[int(label)]
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
        try:
            try:
                if os.write(fd, png) != len(png):  # a short write: the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:  # a full disk, an I/O error: no temporary file stays (the caller says it in one line)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        if i % 1000 == 999:
            bar.update(1000)
    bar.update(len(pixels) % 1000)  # the last, partial thousand
    bar.close()
