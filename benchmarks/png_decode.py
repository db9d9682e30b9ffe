"""images.decode_gray on the 10,000 test images as PNG: the libspng fast path against Pillow, and its checks.

    python benchmarks/png_decode.py              # about 10 s
    python benchmarks/png_decode.py --repeats 15

The images are encoded in memory as `data export-png` writes them (images.encode_png); nothing is written.
Timed in CPU time of this process (time.process_time: one thread, so that busy neighbours on a shared
machine cost it little), best of --repeats, in microseconds per file: decode_gray with pyspng (the fast path,
checks included), decode_gray with ``images.pyspng = None`` (Pillow), and the fast path's own check of the
file (_plain_png: its chunk list and every chunk's CRC) alone. Prints a JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.data import DEBIAN_DIR


def test_pngs() -> tuple[np.ndarray, list[bytes]]:
    raw = gzip.open(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").read()
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    return pixels, [images.encode_png(img) for img in pixels]


def best_us(fn, items: list[bytes], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for data in items:
            fn(data)
        times.append(time.process_time() - start)
    return round(min(times) / len(items) * 1e6, 2)


def measure(repeats: int) -> dict:
    pixels, pngs = test_pngs()
    assert images.pyspng is not None, "pyspng is not installed: there is no fast path to measure"
    assert all(images._fast_png(data) is not None for data in pngs)  # every file takes the fast path
    assert all(np.array_equal(images.decode_gray(d), p) for d, p in zip(pngs, pixels, strict=True))
    fast = best_us(images.decode_gray, pngs, repeats)
    check = best_us(images._plain_png, pngs, repeats)
    saved, images.pyspng = images.pyspng, None
    try:
        pillow = best_us(images.decode_gray, pngs, repeats)
    finally:
        images.pyspng = saved
    return {"files": len(pngs), "mean_png_bytes": round(sum(map(len, pngs)) / len(pngs), 1),
            "decode_fast_us": fast, "decode_pillow_us": pillow, "plain_png_check_us": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(measure(args.repeats), indent=1))


if __name__ == "__main__":
    main()
