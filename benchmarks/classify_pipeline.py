"""`fmnist-onnx bench classify` on a folder of Fashion-MNIST PNG files: the pipeline against its decoding limit.

    python benchmarks/classify_pipeline.py                    # the 60,000 train images as PNG: about 1 min
    python benchmarks/classify_pipeline.py --folder my_pngs --repeats 3

Runs fmnist_onnx.bench_pipeline.bench_classify: the whole classify pipeline (find, decode, infer, write),
with 1, 2, 4, ... workers too, decoding alone (classify's own decoder, in the same number of processes and in
one) and the naive loop (one process, Pillow, batches of 256), each from start to end on a warm page cache,
best of --repeats. Writes benchmarks/results/bench_classify.json with the machine's description. Uses
artifacts/model.onnx; where it is missing it trains the fast recipe and exports it, in a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from classify_vs_naive import png_folder, prepare_model

from fmnist_onnx.bench import bench_classify, format_classify, save_json

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, help="PNG folder [a split exported by `fmnist-onnx data export-png`]")
    p.add_argument("--split", choices=["train", "test"], default="train", help="split to export [train]")
    p.add_argument("--model", type=Path, default=Path("artifacts/model.onnx"))
    p.add_argument("--workers", type=int, help="decoding processes [number of cores]")
    p.add_argument("--provider", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts [2]")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_classify.json")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fmnist-classify-pipeline-") as tmp:
        work = Path(tmp)
        model = prepare_model(args.model, work)
        folder = png_folder(args.folder, args.split, work)
        result = bench_classify(folder, model, args.workers, args.provider, repeats=args.repeats, scaling=True)
    if args.folder is None:
        result["folder"] = f"the {args.split} split as PNG (`fmnist-onnx data export-png --split {args.split}`)"
    save_json(result, args.out, overwrite=True)
    print(format_classify(result))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
