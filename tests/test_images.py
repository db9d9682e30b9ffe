"""images.py on real files: decoding every mode, the fast PNG path against Pillow, preprocessing, broken files."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from fmnist_onnx import images
from fmnist_onnx.data import DEBIAN_DIR


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
    for invert in images.INVERT_MODES:
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


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (gray 8-bit) with a tiny, truncated image stream."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


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
    folder = nobody["folder"] / "images"
    folder.mkdir()
    (folder / "open.png").write_bytes(png_bytes(Image.fromarray(test_images[0])))
    (folder / "secret.png").write_bytes(png_bytes(Image.fromarray(test_images[0])))
    (folder / "secret.png").chmod(0)
    code = ("import json, sys; from fmnist_onnx import images; "
            "print(json.dumps([images.preprocess(p)[1] for p in sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder / "open.png"), str(folder / "secret.png")],
                          capture_output=True, text=True, **nobody["kwargs"])
    assert proc.returncode == 0, proc.stderr
    opened, secret = json.loads(proc.stdout)
    assert opened == "" and "Permission denied" in secret


def test_walk_is_sorted_recursive_and_skips_non_images(tmp_path):
    for rel in ("b/2.png", "b/1.PNG", "a/z/3.jpg", "a/notes.txt", "c.webp", "d.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "b" / "loop")  # a folder reached twice is walked once
    found = list(images.iter_files([tmp_path]))
    files = [os.path.relpath(f.path, tmp_path) for f in found if f.kind == "file"]
    skipped = [os.path.relpath(f.path, tmp_path) for f in found if f.kind == "skip"]
    assert files == ["a/z/3.jpg", "b/1.PNG", "b/2.png", "c.webp"]
    assert sorted(skipped) == ["a/notes.txt", "d.csv"]
    flat = [os.path.relpath(f.path, tmp_path) for f in images.iter_files([tmp_path], recursive=False)
            if f.kind == "file"]
    assert flat == ["c.webp"]
    named = list(images.iter_files([tmp_path / "d.csv"]))  # a file named on the command line is an input
    assert [f.kind for f in named] == ["file"]


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
