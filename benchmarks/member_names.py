"""The parent's cost of naming rows, per image: what the walk pays for a shard's member list (members.batch:
which members are images, their sidecars' classes, their row names, repeats told apart) and for a folder's
loose files (sources.walk over the folder source: names with ``::`` escaped).

    python benchmarks/member_names.py            # 60,000 images: a WebDataset shard's 120,000 member names

No archive is read: the names are made here (``00000.png`` and ``00000.cls`` per image, as
``data export-png --format tar`` writes them), the sidecars' bytes given. Best of --repeats, in microseconds
per image. Prints a JSON object; writes nothing but a temporary folder of empty files (removed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fmnist_onnx.classify import sources
from fmnist_onnx.classify.sources import members


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    n = args.images
    names = [f"{i:05d}{ext}" for i in range(n) for ext in (".png", ".cls")]
    offsets = list(range(len(names)))
    shard = best(lambda: members.batch("tar", "s.tar", names, offsets, offsets,
                                       lambda picks: [b"3"] * len(picks)), args.repeats)
    doubled = names[:n] + names[:n]  # every member twice: each image a repeat of another
    repeated = best(lambda: members.batch("tar", "s.tar", doubled, offsets, offsets,
                                          lambda picks: [b"3"] * len(picks)), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            (Path(tmp) / f"{i:05d}.png").touch()
        folder = best(lambda: sum(len(b.files) for b in sources.walk([tmp], True)), args.repeats)
    print(json.dumps({"images": n, "shard_batch_us_per_image": round(1e6 * shard / n, 3),
                      "all_repeats_batch_us_per_image": round(1e6 * repeated / n, 3),
                      "folder_walk_us_per_image": round(1e6 * folder / n, 3)}))


if __name__ == "__main__":
    main()
