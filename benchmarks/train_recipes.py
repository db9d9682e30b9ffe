"""Training recipes side by side, in one run: the tutorial as written and the fast recipe.

    python benchmarks/train_recipes.py                       # tutorial seed 0, fast seeds 0,1,2: about 2 min
    python benchmarks/train_recipes.py --device cuda --tutorial-seeds 0 --fast-seeds 0,1,2

For each run: wall time (from the call to train() to its return: data loading, the epochs, the test
evaluations and the writes), the epochs' own time, and the final test accuracy. Per recipe: the median over
its seeds. Written to benchmarks/results/train.json with the machine's description, and printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fmnist_onnx.bench import machine_info, save_json
from fmnist_onnx.train import make_config, resolve_device, train

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class RecipeRun:
    recipe: str
    seed: int
    epochs: int
    batch_size: int
    device: str
    test_accuracy: float  # percent, after the last epoch
    wall_s: float  # the whole train() call
    epochs_s: float  # the epochs alone (as train reports it)


def run_one(recipe: str, seed: int, device: str, epochs: int | None, work: Path) -> RecipeRun:
    cfg = make_config(recipe, seed=seed, device=device, epochs=epochs)
    t0 = time.perf_counter()
    result = train(cfg, work / f"{recipe}-{seed}")
    wall = time.perf_counter() - t0
    return RecipeRun(recipe, seed, cfg.epochs, cfg.batch_size, device, result.test_accuracy, wall, result.seconds)


def summarize(runs: list[RecipeRun]) -> dict:
    out = {}
    for recipe in dict.fromkeys(r.recipe for r in runs):
        mine = [r for r in runs if r.recipe == recipe]
        out[recipe] = {
            "seeds": [r.seed for r in mine],
            "median_test_accuracy": statistics.median(r.test_accuracy for r in mine),
            "min_test_accuracy": min(r.test_accuracy for r in mine),
            "max_test_accuracy": max(r.test_accuracy for r in mine),
            "median_wall_s": statistics.median(r.wall_s for r in mine),
            "median_epochs_s": statistics.median(r.epochs_s for r in mine),
        }
    if "fast" in out and "tutorial" in out:
        out["fast_over_tutorial_time"] = out["fast"]["median_wall_s"] / out["tutorial"]["median_wall_s"]
    return out


def seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()] if text else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.add_argument("--tutorial-seeds", default="0", help="comma-separated; empty to skip the tutorial recipe")
    p.add_argument("--fast-seeds", default="0,1,2", help="comma-separated; empty to skip the fast recipe")
    p.add_argument("--epochs", type=int, help="override both recipes' epochs (10): for a quick check only")
    p.add_argument("--out", type=Path, default=RESULTS / "train.json")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    plan = [("tutorial", s) for s in seeds(args.tutorial_seeds)] + [("fast", s) for s in seeds(args.fast_seeds)]
    runs: list[RecipeRun] = []
    with tempfile.TemporaryDirectory(prefix="fmnist-train-bench-") as work:
        for recipe, seed in plan:
            print(f"training {recipe} seed {seed} on {device} ...", file=sys.stderr, flush=True)
            runs.append(run_one(recipe, seed, device, args.epochs, Path(work)))
            r = runs[-1]
            print(f"  {r.test_accuracy:.2f}% in {r.wall_s:.1f} s wall ({r.epochs_s:.1f} s of epochs)",
                  file=sys.stderr, flush=True)
    import torch

    machine = dict(machine_info(), torch_threads=torch.get_num_threads())
    summary = summarize(runs)
    save_json({"machine": machine, "device": device, "runs": [asdict(r) for r in runs], "summary": summary},
              args.out, overwrite=True)

    print(f"{'recipe':<9} {'seeds':<8} {'epochs':>6} {'test acc (median)':>18} {'wall s (median)':>16}")
    for recipe, s in summary.items():
        if isinstance(s, dict):
            epochs = next(r.epochs for r in runs if r.recipe == recipe)
            print(f"{recipe:<9} {','.join(map(str, s['seeds'])):<8} {epochs:>6} "
                  f"{s['median_test_accuracy']:>17.2f}% {s['median_wall_s']:>16.1f}")
    if "fast_over_tutorial_time" in summary:
        print(f"fast / tutorial wall time: {summary['fast_over_tutorial_time']:.2f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
