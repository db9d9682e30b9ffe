"""Image files -> the model's input: find files, read, decode, preprocess. Defined once, used by classify
(local worker processes) and the Ray engine alike. No torch here; numpy and Pillow only (pyspng if present).

The preprocessing, for any image Pillow opens:
1. Decode to 8-bit grayscale. Palette and RGB(A) images go through RGB; transparency is composited onto
   white (a cut-out product photo is then a garment on white, like the photos Fashion-MNIST was made from).
   16-bit grayscale is scaled (v >> 8), never clipped as Pillow's ``convert("L")`` does.
2. A 28x28 image is used as it is. Any other size: crop to the object (pixels that differ from the border
   colour), pad to a square with the border colour (aspect ratio kept), resize to 28x28 (Lanczos).
3. ``invert="auto"``: an image whose border is light (mean over the outermost pixels above 127.5) is a dark
   object on a light background, like a product photo, and is inverted to Fashion-MNIST's light-on-dark.
4. Scale to float32 in [0, 1] (x / 255), as torchvision's ToTensor does in training.

Errors are values: every function that takes one file gives its error as a short string, so one broken
file never ends a million-file run.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fmnist_onnx.spec import CLASSES, IMAGE_SIZE, class_folder_name

log = logging.getLogger(__name__)

# Bounds on what one file may cost: a decompression bomb (a small file that decodes to gigapixels) or a
# huge file is an error row, not an out-of-memory kill. 64 Mpx covers 48 Mpx phone photos.
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 256 << 20
INVERT_MODES = ("auto", "yes", "no")
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


# ---------------------------------------------------------------------------------------------- finding files

class Found(NamedTuple):
    """One entry of the walk: an input file (kind 'file'), a file skipped as not an image ('skip'), or a
    folder that could not be listed ('unlistable': it gets an error row, since its files would be lost).
    A NamedTuple: made once per file, it must be cheap."""

    path: str
    kind: str
    error: str = ""


def iter_files(paths: Sequence[str | Path], recursive: bool = True) -> Iterator[Found]:
    """Every input file under ``paths``, streamed in a deterministic order (depth first, names sorted per
    folder), so memory stays flat whatever the number of files. Files named on the command line are
    always inputs; inside folders, files with an image suffix are, others are skipped. Symbolic links are
    followed (a dangling one is an input, and gets an error row); a folder reached twice is walked once."""
    exts = image_extensions()
    seen_dirs: set[tuple[int, int]] = set()
    for arg in paths:
        p = os.fspath(arg)
        if os.path.isdir(p):
            yield from _walk(p, exts, recursive, seen_dirs)
        else:
            yield Found(p, "file")


def _walk(folder: str, exts: frozenset[str], recursive: bool, seen: set[tuple[int, int]]) -> Iterator[Found]:
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a link loop, or a folder named twice
            log.warning("%s: already walked, skipped", folder)
            return
        seen.add(key)
        with os.scandir(folder) as it:
            # names and kinds only (not DirEntry objects): a flat folder of a million files must fit in memory
            entries = sorted((e.name, _is_dir(e)) for e in it)
    except OSError as e:
        yield Found(folder, "unlistable", f"cannot list folder: {e.strerror or e}")
        return
    for name, is_dir in entries:
        path = os.path.join(folder, name)
        if is_dir:
            if recursive:
                yield from _walk(path, exts, recursive, seen)
            continue
        if os.path.splitext(name)[1].lower() in exts:
            yield Found(path, "file")  # also a dangling link or an unreadable file: it gets its error row
        else:
            yield Found(path, "skip")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; free (no stat) for plain entries on Linux
    except OSError:
        return False


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

def _fast_png(data: bytes) -> np.ndarray | None:
    """8-bit grayscale PNG without transparency through libspng, or None (then Pillow decodes it)."""
    if pyspng is None or len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, color = struct.unpack_from(">IIBB", data, 16)
    if depth != 8 or color != 0 or width * height > MAX_PIXELS or b"tRNS" in data:
        return None
    try:
        a = pyspng.load(data)
    except Exception:  # noqa: BLE001 - any libspng failure: Pillow decides, and words the error
        return None
    if a.dtype != np.uint8 or a.shape != (height, width):
        return None
    return a


def _to_gray(im) -> np.ndarray:
    """A loaded Pillow image of any mode as 8-bit grayscale [h, w]."""
    Image = _pil()
    mode = im.mode
    if mode in ("1", "L") and "transparency" not in im.info:
        return np.asarray(im.convert("L") if mode == "1" else im)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale: keep the high byte. Pillow's convert("L") would clip everything above 255.
        a = np.asarray(im).astype(np.int64)
        return (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
    if mode == "F":
        return np.clip(np.asarray(im), 0, 255).astype(np.uint8)
    if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV: through RGB, so that "L" means the same everywhere
    return np.asarray(im.convert("L"))


def decode_gray(data: bytes) -> np.ndarray:
    """Encoded image bytes -> 8-bit grayscale [h, w] (first frame of an animation), or ImageError."""
    if not data:
        raise ImageError("empty file")
    fast = _fast_png(data)
    if fast is not None:
        return fast
    Image = _pil()
    from PIL import UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > MAX_PIXELS:  # from the header, before decoding anything
                raise ImageError(f"image too large: {width}x{height} pixels (limit {MAX_PIXELS}, "
                                 "a possible decompression bomb)")
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})")
            if im.format == "JPEG" and min(width, height) > 4 * IMAGE_SIZE:
                im.draft("RGB", (4 * IMAGE_SIZE, 4 * IMAGE_SIZE))  # decode a big JPEG at 1/2..1/8 scale
            im.load()
            return _to_gray(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}") from None
    except MemoryError:
        raise ImageError("image too large to decode (out of memory)") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageError(f"cannot decode: {msg[:200]}") from None


# ---------------------------------------------------------------------------------------------- preprocessing

def _border(a: np.ndarray) -> np.ndarray:
    """The outermost pixels of a 2-D image, as one flat array."""
    if a.shape[0] <= 2 or a.shape[1] <= 2:
        return a.ravel()
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _light_border(border: np.ndarray) -> bool:
    """A mean border value above 127.5 (exact integer arithmetic, same in the batch path)."""
    return 2 * int(border.sum(dtype=np.int64)) > 255 * border.size


def fit_square(gray: np.ndarray, background: int) -> np.ndarray:
    """Any size -> 28x28: crop to the object, pad to a square with ``background``, resize (Lanczos)."""
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return gray
    Image = _pil()
    # The object: pixels that differ clearly from the background. Fashion-MNIST's garments fill the frame.
    mask = np.abs(gray.astype(np.int16) - background) > 24
    if mask.any():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        gray = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = gray.shape
    side = max(h, w)
    square = np.full((side, side), background, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = gray
    im = Image.fromarray(square)
    return np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0))


def preprocess_gray(gray: np.ndarray, invert: str = "auto") -> np.ndarray:
    """8-bit grayscale of any size -> uint8 [28, 28] in Fashion-MNIST's polarity (see the module doc)."""
    border = _border(gray)
    flip = invert == "yes" or (invert == "auto" and _light_border(border))
    out = fit_square(gray, int(np.median(border)) if gray.shape != (IMAGE_SIZE, IMAGE_SIZE) else 0)
    return 255 - out if flip else out


def load_bytes(data: bytes, invert: str = "auto") -> np.ndarray:
    """Encoded image bytes -> uint8 [28, 28], or ImageError."""
    return preprocess_gray(decode_gray(data), invert)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], exactly as ToTensor scales in training."""
    x = images.astype(np.float32)
    x /= 255.0
    return x.reshape(len(images), 1, IMAGE_SIZE, IMAGE_SIZE)


def preprocess(source: bytes | str | Path, invert: str = "auto") -> tuple[np.ndarray | None, str]:
    """One image (its bytes, or a path) -> (float32 [1, 28, 28], "") or (None, error message)."""
    try:
        data = source if isinstance(source, bytes | bytearray) else read_file(source)
        return to_model_input(load_bytes(bytes(data), invert)[None])[0], ""
    except ImageError as e:
        return None, str(e)


def preprocess_batch(sources: Iterable[bytes | str | Path], invert: str = "auto") -> tuple[np.ndarray, list[str]]:
    """Many images (bytes or paths) -> (uint8 [N, 28, 28], errors): errors[i] is "" where image i is good,
    else its message (and image i is zeros). Same result as ``preprocess`` image by image, faster: the
    common case (a 28x28 8-bit grayscale PNG) skips the per-image numpy work, and the invert decision
    is taken for all such images at once. uint8, not float32, to ship 4x fewer bytes between processes."""
    sources = list(sources)
    out = np.zeros((len(sources), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors = [""] * len(sources)
    plain = []  # 28x28 images whose invert decision is still to take
    for i, src in enumerate(sources):
        try:
            data = src if isinstance(src, bytes | bytearray) else read_file(src)
            gray = decode_gray(bytes(data))
            if gray.shape == (IMAGE_SIZE, IMAGE_SIZE) and invert == "auto":
                out[i] = gray
                plain.append(i)
            else:
                out[i] = preprocess_gray(gray, invert)
        except ImageError as e:
            errors[i] = str(e)
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
    """Write uint8 images [N, 28, 28] as ``out/<class folder>/<index>.png`` (the ImageFolder layout),
    each file written under a temporary name and renamed. Returns the number of files written."""
    Image = _pil()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ImageError(f"{out} is not empty; choose another --out, or --overwrite to write into it")
    for name in CLASSES:
        (out / class_folder_name(name)).mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(pixels) - 1)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pixels), unit="img", desc="export-png")
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        dest = out / class_folder_name(CLASSES[int(label)]) / f"{i:0{width}d}.png"
        tmp = dest.with_name(f".{dest.name}.tmp")
        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(tmp, format="PNG")  # 2-D uint8: mode L
        os.replace(tmp, dest)
        if bar is not None and i % 1000 == 999:
            bar.update(1000)
    if bar is not None:
        bar.close()
    return len(pixels)
