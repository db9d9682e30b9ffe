"""The parent's cost of naming rows, per image: what the walk pays for a shard's member list (members.batch:
which members are images, their sidecars' classes, their row names, repeats told apart) and for a folder's
loose files (sources.walk over the folder source: names with ``::`` escaped).

    python benchmarks/member_names.py            # 60,000 images: a WebDataset shard's 120,000 member names

No archive is read: the names are made here (``00000.png`` and ``00000.cls`` per image, as
``data export-png --format tar`` writes them), the sidecars' bytes given. Best of --repeats, in microseconds
of this process's CPU time per image (other busy processes on the machine count less than in wall time), the
names made anew before each repeat (a walk's names are new strings: their hashes are not known yet). Prints a
JSON object; writes nothing but a temporary folder of empty files (removed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fmnist_onnx.classify import sources
from fmnist_onnx.classify.sources import members


def best(fn, repeats: int, make=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        made = make()
        t0 = time.process_time()
        fn(made)
        times.append(time.process_time() - t0)
    return min(times)


def shard_names(n: int, repeat: bool = False) -> list[str]:
    """A shard's member names, new strings; ``repeat``: its second half names the first half's images again."""
    count = n // 2 if repeat else n
    return [f"{i % count:05d}{ext}" for i in range(n) for ext in (".png", ".cls")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    n = args.images
    offsets = list(range(2 * n))

    def batch(names: list[str]):
        return members.batch("tar", "s.tar", names, offsets, offsets, lambda picks: [b"3"] * len(picks))

    shard = best(batch, args.repeats, lambda: shard_names(n))
    repeated = best(batch, args.repeats, lambda: shard_names(n, repeat=True))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            (Path(tmp) / f"{i:05d}.png").touch()
        folder = best(lambda _: sum(len(b.files) for b in sources.walk([tmp], True)), args.repeats)
    print(json.dumps({"images": n, "shard_batch_us_per_image": round(1e6 * shard / n, 3),
                      "half_repeated_batch_us_per_image": round(1e6 * repeated / n, 3),
                      "folder_walk_us_per_image": round(1e6 * folder / n, 3)}))


if __name__ == "__main__":
    main()
