"""images.py on real files: decoding every mode, the fast PNG path against Pillow, preprocessing, broken files."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from fmnist_onnx import images
from fmnist_onnx.data import DEBIAN_DIR
from fmnist_onnx.spec import INVERT_MODES


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    """The first 300 test images, uint8 [300, 28, 28], read straight from the idx file (no torch)."""
    raw = gzip.open(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").read()
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:300].copy()


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def product_photo(img: np.ndarray, size=(150, 110), scale=4) -> Image.Image:
    """A Fashion-MNIST image as a product photo would look: dark garment on a white, wider canvas."""
    garment = Image.fromarray(255 - img).resize((28 * scale, 28 * scale), Image.Resampling.LANCZOS)
    canvas = Image.new("L", size, 255)
    canvas.paste(garment, ((size[0] - garment.width) // 2, (size[1] - garment.height) // 2))
    return canvas


def test_fast_png_path_equals_pillow_and_the_dataset(test_images, monkeypatch):
    assert images.pyspng is not None, "pyspng is a dependency: the fast path must be tested"
    data = [png_bytes(Image.fromarray(a)) for a in test_images]
    fast, errors = images.preprocess_batch(data, invert="no")
    assert not any(errors)
    monkeypatch.setattr(images, "pyspng", None)  # the fallback every install has
    slow, _ = images.preprocess_batch(data, invert="no")
    np.testing.assert_array_equal(fast, test_images)
    np.testing.assert_array_equal(slow, test_images)


def test_batch_equals_one_by_one(test_images):
    odd = [png_bytes(Image.fromarray(test_images[0])), png_bytes(Image.fromarray(255 - test_images[1])),
           png_bytes(product_photo(test_images[2])), b"not an image", png_bytes(Image.fromarray(test_images[3]))]
    for invert in INVERT_MODES:
        batch, errors = images.preprocess_batch(odd, invert)
        for i, data in enumerate(odd):
            x, err = images.preprocess(data, invert)
            assert err == errors[i]
            if not err:
                np.testing.assert_array_equal(x[0], batch[i] / np.float32(255))
                assert x.shape == (1, 28, 28) and x.dtype == np.float32


def test_to_model_input_scales_like_to_tensor(test_images):
    x = images.to_model_input(test_images[:4])
    assert x.shape == (4, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], test_images[:4].astype(np.float32) / 255)


def test_16_bit_grayscale_is_scaled_not_clipped(test_images):
    a16 = test_images[0].astype(np.uint16) * 257  # full 16-bit range
    data = png_bytes(Image.fromarray(a16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    np.testing.assert_array_equal(images.decode_gray(data), test_images[0])


@pytest.mark.parametrize("mode", ["P", "RGB", "RGBA", "LA", "1"])
def test_modes_become_the_same_grayscale(test_images, mode):
    img = test_images[5]
    if mode == "1":
        img = np.where(img > 127, 255, 0).astype(np.uint8)
    im = Image.fromarray(img).convert(mode)
    gray = images.decode_gray(png_bytes(im))
    tolerance = 2 if mode == "P" else 0  # an image's palette is an exact grey ramp, up to rounding
    assert np.abs(gray.astype(int) - img).max() <= tolerance


def test_transparency_is_composited_on_white(test_images):
    img = test_images[6]
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 40  # a dark garment, opaque where the image has it, transparent elsewhere
    rgba[..., 3] = np.where(img > 0, 255, 0)
    gray = images.decode_gray(png_bytes(Image.fromarray(rgba)))
    assert (gray[img == 0] == 255).all() and (gray[img > 0] == 40).all()


def test_other_formats(test_images, tmp_path):
    img = Image.fromarray(test_images[7])
    for fmt in ("BMP", "WEBP", "GIF", "TIFF"):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        np.testing.assert_array_equal(images.decode_gray(buf.getvalue()), test_images[7], err_msg=fmt)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    assert np.abs(images.decode_gray(buf.getvalue()).astype(int) - test_images[7]).mean() < 3


def test_product_photo_is_inverted_cropped_and_resized(test_images):
    img = test_images[8]
    photo = png_bytes(product_photo(img))
    auto, yes, no = (images.load_bytes(photo, inv) for inv in ("auto", "yes", "no"))
    np.testing.assert_array_equal(auto, yes)
    np.testing.assert_array_equal(no, 255 - yes)
    assert auto.shape == (28, 28)
    # cropped to the garment, padded, resized: close to the original, not a small garment in a big frame
    assert np.corrcoef(auto.ravel().astype(float), img.ravel().astype(float))[0, 1] > 0.9


def test_fashion_mnist_polarity_is_kept_by_auto(test_images):
    data = [png_bytes(Image.fromarray(a)) for a in test_images[:50]]
    out, _ = images.preprocess_batch(data, "auto")
    np.testing.assert_array_equal(out, test_images[:50])


def test_aspect_ratio_is_kept(test_images):
    wide = np.zeros((20, 80), np.uint8)
    wide[5:15, 10:70] = 200  # a 6:1 bar on black
    out = images.load_bytes(png_bytes(Image.fromarray(wide)), "no")
    rows = np.flatnonzero(out.max(1) > 100)
    cols = np.flatnonzero(out.max(0) > 100)
    assert cols.size >= 26 and 3 <= rows.size <= 6  # still a long thin bar, centred
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk; ``crc`` replaces the right checksum (a damaged file)."""
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def gray_png(width: int, height: int, rows: bytes, before_idat: bytes = b"", ihdr_crc: int | None = None) -> bytes:
    """An 8-bit grayscale PNG written chunk by chunk: ``rows`` is the filtered image data (a 0 before each row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr, ihdr_crc) + before_idat + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (gray 8-bit) with a tiny, truncated image stream."""
    return gray_png(width, height, b"\0" * (width + 1))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"hello, I am text", "not an image"),
    (bomb_png(20000, 20000), "too large"),
    (bomb_png(9000, 8000), "too large"),
])
def test_bad_bytes_are_errors_not_exceptions(data, message):
    x, err = images.preprocess(data)
    assert x is None and message in err


def test_truncated_png_is_an_error(test_images):
    data = png_bytes(Image.fromarray(test_images[9]))
    x, err = images.preprocess(data[: len(data) // 2])
    assert x is None and err


# ---------------------------------------------------------------------------------------------- hostile input

def pad_and_resize(gray: np.ndarray, background: int) -> np.ndarray:
    """What fit_square computed before it was bounded: the whole padded square, then Pillow's resize."""
    mask = np.abs(gray.astype(np.int16) - background) > 24
    if mask.any():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        gray = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = gray.shape
    side = max(h, w)
    square = np.full((side, side), background, np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = gray
    return np.asarray(Image.fromarray(square).resize((28, 28), Image.Resampling.LANCZOS, reducing_gap=3.0))


@pytest.mark.parametrize("shape", [(29, 28), (1, 500), (150, 110), (167, 90), (168, 168), (700, 900), (3, 2000),
                                   (1234, 457), (2100, 40)])
def test_fit_square_gives_the_padded_square_pixels_without_building_it(shape):
    rng = np.random.default_rng(sum(shape))
    for background in (0, 255, 131):
        gray = np.full(shape, background, np.uint8)
        h, w = shape
        rows, cols = slice(h // 5, max(1, h - h // 7)), slice(w // 9, max(1, w - w // 4))  # an object, off centre
        gray[rows, cols] = rng.integers(0, 256, gray[rows, cols].shape)
        np.testing.assert_array_equal(images.fit_square(gray, background), pad_and_resize(gray, background),
                                      err_msg=f"{shape} on {background}")


@pytest.mark.parametrize("shape", [(1, 4_000_000), (4_000_000, 1), (200, 20_000)])
def test_fit_square_costs_the_images_pixels_not_the_square(shape):
    """A 1 x 4,000,000 image padded to a square would be 16 TB (numpy's MemoryError); 200 x 20,000, 400 MB."""
    import tracemalloc

    gray = np.zeros(shape, np.uint8)
    gray[: max(1, shape[0] // 2), : max(1, shape[1] // 3)] = 200  # an object, off centre
    tracemalloc.start()
    try:
        out = images.fit_square(gray, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert peak < 4 * gray.size, f"{peak / 1e6:.0f} MB for a {gray.size / 1e6:.0f} MB image"
    # and the numbers are right: an image of one grey stays that grey (blocks of 47,619² pixels included)
    assert (images.fit_square(np.full(shape, 90, np.uint8), 90) == 90).all()


@pytest.mark.parametrize("shape", [(1100, 1000), (1, 1_500_000)])
def test_big_images_become_grayscale_a_tile_at_a_time_with_the_same_pixels(shape):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    palette = Image.fromarray(rgba[..., 0]).convert("P")
    palette.info["transparency"] = 7
    for im in (Image.fromarray(rgba), Image.fromarray(rgba[..., :2].copy(), "LA"), palette,
               Image.fromarray(rgba[..., 0].astype(np.uint16) * 250), Image.fromarray(rgba).convert("CMYK")):
        assert im.width * im.height > images._TILE_PIXELS
        np.testing.assert_array_equal(images._to_gray(im), images._gray_tile(im), err_msg=im.mode)


@pytest.mark.parametrize(("width", "height"), [(9000, 8000), (20000, 20000), (64_000_001, 1)])
def test_bomb_message_names_our_limit(width, height):
    """Pillow words its own bomb error with twice the limit (128,000,000): one wording, the README's limit."""
    data = bomb_png(width, height)
    for _, err in (images.preprocess(data), _without_pyspng(data)):
        assert err.startswith("image too large: ") and "limit 64,000,000 pixels" in err, err
        assert "128" not in err, err


def _without_pyspng(data: bytes) -> tuple[np.ndarray | None, str]:
    saved, images.pyspng = images.pyspng, None
    try:
        return images.preprocess(data)
    finally:
        images.pyspng = saved


def _rows(a: np.ndarray) -> bytes:
    return b"".join(b"\0" + r.tobytes() for r in a)


def hostile_pngs(img: np.ndarray) -> dict[str, bytes]:
    """PNGs that libspng decodes but Pillow refuses (or reads differently), and harmless variants."""
    rows = _rows(img)
    good = gray_png(28, 28, rows)
    zbomb = zlib.compress(b"\0" * (8 << 20), 9)  # 8 KB that inflates to 8 MB: Pillow's text limit is 1 MB
    return {
        "bad IHDR CRC": gray_png(28, 28, rows, ihdr_crc=0x12345678),
        "bad gAMA CRC": gray_png(28, 28, rows, chunk(b"gAMA", struct.pack(">I", 45455), crc=1)),
        "zTXt bomb": gray_png(28, 28, rows, chunk(b"zTXt", b"Comment\0\0" + zbomb)),
        "iTXt bomb": gray_png(28, 28, rows, chunk(b"iTXt", b"Comment\0\1\0\0\0" + zbomb)),
        "iCCP bomb": gray_png(28, 28, rows, chunk(b"iCCP", b"icc\0\0" + zbomb)),
        "text": gray_png(28, 28, rows, chunk(b"tEXt", b"Comment\0hello")),
        "harmless chunks": gray_png(28, 28, rows, chunk(b"gAMA", struct.pack(">I", 45455))
                                    + chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)) + chunk(b"sRGB", b"\0")),
        "bad IDAT CRC (Pillow does not check it)": good[:-16] + b"\0\0\0\0" + good[-12:],
        "truncated": good[:-20],
        "private chunk": gray_png(28, 28, rows, chunk(b"prVt", b"x" * 100)),
    }


def test_results_do_not_depend_on_pyspng(test_images):
    cases = hostile_pngs(test_images[11])
    for name, data in cases.items():
        fast, slow = images.preprocess(data), _without_pyspng(data)
        assert fast[1] == slow[1], name
        if not fast[1]:
            np.testing.assert_array_equal(fast[0], slow[0], err_msg=name)
    # what Pillow alone refuses
    assert _without_pyspng(cases["bad IHDR CRC"])[1] == "cannot decode PNG: its header is damaged"
    assert "Decompressed data too large" in _without_pyspng(cases["zTXt bomb"])[1]
    # and the fast path still takes the plain ones
    assert images._fast_png(cases["harmless chunks"]) is not None
    assert images._fast_png(png_bytes(Image.fromarray(test_images[0]))) is not None
    assert images._fast_png(cases["zTXt bomb"]) is None and images._fast_png(cases["bad IHDR CRC"]) is None


def jpeg_bytes(a: np.ndarray, orientation: int | None = None, exif: bytes | None = None) -> bytes:
    """A JPEG of ``a`` with an EXIF orientation tag, or the given raw EXIF block."""
    if exif is None:
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_exif_orientation_is_applied_as_exif_transpose_does(test_images, fmt):
    from PIL import ImageOps

    img = np.ascontiguousarray(test_images[12][:, 3:])  # 28x25: not square, so that a turn shows in the shape
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, exif=exif)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("L"))
        np.testing.assert_array_equal(images.decode_gray(buf.getvalue()), expected, err_msg=f"{fmt} {orientation}")
        assert images.decode_gray(buf.getvalue()).shape == ((28, 25) if orientation <= 4 else (25, 28))


def test_a_photo_taken_sideways_is_preprocessed_upright(test_images):
    photo = 255 - np.asarray(Image.fromarray(test_images[13]).resize((112, 112)))  # dark garment on white
    upright = images.load_bytes(jpeg_bytes(photo))
    for orientation, pixels in ((6, np.rot90(photo, 1)), (8, np.rot90(photo, -1)), (3, photo[::-1, ::-1])):
        turned = images.load_bytes(jpeg_bytes(np.ascontiguousarray(pixels), orientation))
        assert np.abs(turned.astype(int) - upright).mean() < 2, orientation


def damaged_tiff(img: np.ndarray) -> bytes:
    """A TIFF whose (only) strip of compressed data is overwritten: libtiff fails with decoder error -2."""
    buf = io.BytesIO()
    im = Image.fromarray(img)
    im.save(buf, format="TIFF", compression="tiff_adobe_deflate")
    data = buf.getvalue()
    tif = Image.open(io.BytesIO(data))
    offset, count = tif.tag_v2[273][0], tif.tag_v2[279][0]  # StripOffsets, StripByteCounts
    return data[:offset] + b"\xff" * count + data[offset + count:]


def test_decoder_errors_say_what_a_user_can_act_on(test_images):
    _, err = images.preprocess(damaged_tiff(test_images[14]))
    assert err == ("cannot decode TIFF: the image data is damaged or uses an unsupported compression "
                   "(decoder error -2)")
    _, err = images.preprocess(png_bytes(Image.fromarray(test_images[14]).convert("RGB"))[:-30])
    assert err.startswith("cannot decode PNG: "), err


def test_libtiff_warnings_go_to_the_debug_log_with_the_file_name(test_images, capfd, caplog):
    """libtiff writes to fd 2 itself: nothing may reach stderr, and the debug log names the file."""
    import logging

    data = damaged_tiff(test_images[15])  # libtiff: "ZIPDecode: Decoding error at scanline 0, ..."
    with caplog.at_level(logging.DEBUG, logger="fmnist_onnx.images"):
        _, err = images.preprocess_batch([data])
    assert "decoder error -2" in err[0]
    assert capfd.readouterr().err == ""
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("image 0: ") and "ZIPDecode" in m for m in logged), logged


def test_python_warnings_of_decoders_go_to_the_debug_log(test_images, caplog, recwarn, tmp_path):
    import logging

    # EXIF whose Make tag (0x010F) says its 20 bytes are at offset 65535, past the end: Pillow warns on reading it
    tiff = b"II*\0" + struct.pack("<IHHHII", 8, 1, 0x010F, 2, 20, 65535) + struct.pack("<I", 0)
    path = tmp_path / "camera.jpg"
    path.write_bytes(jpeg_bytes(test_images[16], exif=b"Exif\0\0" + tiff))
    with caplog.at_level(logging.DEBUG, logger="fmnist_onnx.images"):
        x, err = images.preprocess(path)
    assert err == "" and x is not None
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{path}: UserWarning: ") for m in logged), logged  # "Truncated File Read"


def test_unreadable_files_are_errors(tmp_path):
    (tmp_path / "target.png").write_bytes(b"x")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    os.mkfifo(tmp_path / "pipe.png")
    assert images.preprocess(tmp_path / "dangling.png")[1] == "dangling symbolic link"
    assert images.preprocess(tmp_path / "nowhere.png")[1] == "file not found"
    assert images.preprocess(tmp_path / "pipe.png")[1] == "not a regular file"  # and no hang
    assert images.preprocess(tmp_path)[1] == "is a folder"


def test_permission_denied_is_an_error(nobody, test_images):
    """chmod stops every user but root, and CI runs as root: preprocess runs as `nobody` there (conftest)."""
    folder = nobody.folder / "images"
    folder.mkdir()
    (folder / "open.png").write_bytes(png_bytes(Image.fromarray(test_images[0])))
    (folder / "secret.png").write_bytes(png_bytes(Image.fromarray(test_images[0])))
    (folder / "secret.png").chmod(0)
    code = ("import json, sys; from fmnist_onnx import images; "
            "print(json.dumps([images.preprocess(p)[1] for p in sys.argv[1:]]))")
    proc = nobody.run([sys.executable, "-c", code, folder / "open.png", folder / "secret.png"])
    assert proc.returncode == 0, proc.stderr
    opened, secret = json.loads(proc.stdout)
    assert opened == "" and "Permission denied" in secret


def test_true_class_from_folder_names():
    assert images.true_class("x/test/T-shirt-top/00001.png") == 0
    assert images.true_class("x/Ankle boot/sub/1.png") == 9
    assert images.true_class("x/Bag/Trouser/1.png") == 1  # the nearest class folder
    assert images.true_class("photos/1.png") is None
    assert images.true_class("Bag") is None  # a file named like a class is not a folder


def test_export_png_layout_and_pixels(test_images, tmp_path):
    labels = np.arange(20) % 10
    assert images.export_png(test_images[:20], labels, tmp_path / "out") == 20
    files = sorted((tmp_path / "out").rglob("*.png"))
    assert len(files) == 20 and {f.parent.name for f in files} == {
        "T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    for f in files:
        i = int(f.stem)
        assert images.true_class(str(f)) == labels[i]
        np.testing.assert_array_equal(np.asarray(Image.open(f)), test_images[i])
    with pytest.raises(images.ImageError, match="not empty"):
        images.export_png(test_images[:2], labels[:2], tmp_path / "out")
