"""The route of a classify run through the code, by its calls (issue 29's measure of how it bounces).

    python benchmarks/classify_route.py --model artifacts/model.onnx

Runs `fmnist-onnx classify` in this process (click's CliRunner, --workers 1) on 20 test PNGs in the ImageFolder
layout, with --report, twice: a fresh run, then --resume of the finished output. A profiler (sys.setprofile, this
thread only) records every call into the package from the command's entry to its end. What a run does to its
inputs and engine (classify/sources, classify/engines, predict, images, runtime, archives) and the leaves (the
report page's rendering, the PNG's drawing) are each one stop: the calls inside them are not followed; the
bottom layer's helpers (errors, text, signals, spec, testing, progress, timing, contract's records) and imports on
first use are no stop. Each function is followed once, the first time it is called (as a reader follows the code,
not once a row or a chunk). The issue did not say how it counted; the trace is read three ways:

- by module: each call's module in turn, consecutive ones merged; a climb is a module in a higher layer than
  the one before (the layers of pyproject.toml's import-linter contracts, classify's own inside its one);
- by call: each call from one file into another is a stop; a climb is a call made from a higher layer than the
  file of the stop before it (the reader went back up to go on);
- the calls that take a run's file (closest to the issue's "the output, the journal and the record derived
  from them"): by module, only the calls given one of the run's file names or an object standing for them
  (Request, RunFiles, Run, JournalSink, OutputLock).

The issue's targets: at most 5 climbs, no file entered more than 3 times.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import tomllib

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/datasets/fashion-mnist")
FOLLOWED = ("fmnist_onnx.classify.pipeline", "fmnist_onnx.classify.run_files", "fmnist_onnx.classify.outputs",
            "fmnist_onnx.classify.resume", "fmnist_onnx.classify.request", "fmnist_onnx.classify.tally",
            "fmnist_onnx.cli", "fmnist_onnx.journal", "fmnist_onnx.stdout_sink", "fmnist_onnx.parquet_writer",
            "fmnist_onnx.files", "fmnist_onnx.table", "fmnist_onnx.report")
IGNORED = ("fmnist_onnx.errors", "fmnist_onnx.text", "fmnist_onnx.signals", "fmnist_onnx.spec", "fmnist_onnx.testing",
           "fmnist_onnx.progress", "fmnist_onnx.timing", "fmnist_onnx.classify.contract", "fmnist_onnx.classify")
OPAQUE_FUNCTIONS = {("fmnist_onnx.report", "build_report"), ("fmnist_onnx.report", "check_destination")}


def layer_ranks() -> dict[str, tuple[int, int]]:
    """module -> (its layer in the package, its layer inside classify): smaller is higher."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    ranks: dict[str, tuple[int, int]] = {}
    outer = next(c for c in contracts if c["name"] == "the package's layers")["layers"]
    inner = next(c for c in contracts if c.get("containers") == ["fmnist_onnx.classify"])["layers"]
    for i, layer in enumerate(outer):
        for name in layer.replace(":", "|").split("|"):
            ranks[name.strip()] = (i, 0)
    top = ranks["fmnist_onnx.classify"][0]
    for j, name in enumerate(inner):
        ranks[f"fmnist_onnx.classify.{name}"] = (top, j)
    return ranks


def rank_of(module: str, ranks: dict[str, tuple[int, int]]) -> tuple[int, int]:
    while module not in ranks and "." in module:
        module = module.rsplit(".", 1)[0]
    return ranks.get(module, (99, 99))


OWNERS = {"Request", "RunFiles", "Run", "JournalSink", "OutputLock"}  # objects that stand for the run's files


class Route:
    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        self.names = names  # the run's files, by the names the command gives
        self.file_stops: list[str] = []  # the stops whose call takes one of them, or an object that holds them
        self.stops: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (caller, callee) of each call from one file into another
        self.depth = 0  # > 0: inside an opaque call, not followed
        self.on = False
        self.seen: set = set()

    def profile(self, frame, event, arg) -> None:
        if not self.on or event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("fmnist_onnx"):
            return
        if event == "return":
            if self.depth and frame is self.opaque_frame:
                self.depth = 0
            return
        if self.depth or module in IGNORED:
            return
        if frame.f_code.co_name == "<module>":  # an import on first use: not the run's route
            self.depth, self.opaque_frame = 1, frame
            return
        if frame.f_code in self.seen:  # a reader follows each function once, not once a row
            return
        self.seen.add(frame.f_code)
        followed = module in FOLLOWED and (module, frame.f_code.co_name) not in OPAQUE_FUNCTIONS
        name = module.removeprefix("fmnist_onnx.")
        if not self.stops or self.stops[-1] != name:
            self.stops.append(name)
        if any(self._is_run_file(v) for v in frame.f_locals.values()) and (
                not self.file_stops or self.file_stops[-1] != name):
            self.file_stops.append(name)
        caller = frame.f_back
        while caller is not None and (caller.f_globals.get("__name__", "") in IGNORED
                                      or not caller.f_globals.get("__name__", "").startswith("fmnist_onnx")):
            caller = caller.f_back
        caller_name = caller.f_globals.get("__name__", "").removeprefix("fmnist_onnx.") if caller else ""
        if caller_name != name:
            self.calls.append((caller_name, name))
        if not followed:
            self.depth, self.opaque_frame = 1, frame


    def _is_run_file(self, v) -> bool:
        if isinstance(v, (str, Path)):
            return str(v) in self.names
        return type(v).__name__ in OWNERS


def run_file_names(out: Path, page: Path) -> frozenset[str]:
    """The run's files as issue 29 lists them (output, journal, records, lock, confusion PNG, page and its lock)."""
    names = [out, Path(f"{out}.partial"), Path(f"{out}.partial.run.json"), Path(f"{out}.run.json"),
             Path(f"{out}.lock"), out.with_name(out.stem + ".confusion.png"), page, Path(f"{page}.lock")]
    return frozenset(str(n) for n in names)


def images(folder: Path, n: int) -> None:
    with gzip.open(DATA / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(DATA / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    from PIL import Image

    from fmnist_onnx.spec import CLASSES

    for i, (p, y) in enumerate(zip(pixels, labels, strict=True)):
        d = folder / CLASSES[y].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(d / f"{i}.png")


def trace(args: list[str], names: frozenset[str]) -> Route:
    from click.testing import CliRunner

    from fmnist_onnx.cli import cli

    route = Route(names)
    runner = CliRunner()
    route.on = True
    sys.setprofile(route.profile)
    try:
        result = runner.invoke(cli, args, catch_exceptions=False)
    finally:
        sys.setprofile(None)
    assert result.exit_code == 0, result.output
    return route


def show(title: str, route: Route, ranks: dict[str, tuple[int, int]]) -> None:
    """Two readings of one trace. By module: each call's module in turn (consecutive ones merged), a climb being
    a module in a higher layer than the one before. By call: each call from one file into another is a stop (a
    return to the calling function is not), a climb being a call made from a higher layer than the file of the
    stop before it (the reader went back up to go on)."""
    def rank(m: str) -> tuple[int, int]:
        return rank_of("fmnist_onnx." + m, ranks)

    stops = route.stops
    climbs = [(a, b) for a, b in zip(stops, stops[1:], strict=False) if rank(b) < rank(a)]
    entered = Counter(stops)
    print(f"{title}, by module: {len(stops)} stops in {len(entered)} files, {len(climbs)} climbs; entered most: "
          + ", ".join(f"{m} {n}" for m, n in entered.most_common(6)))
    print("  route: " + " > ".join(stops))
    calls = route.calls
    up = [(prev[1], c) for prev, c in zip(calls, calls[1:], strict=False) if c[0] and rank(c[0]) < rank(prev[1])]
    entered = Counter(callee for _, callee in calls)
    print(f"{title}, by call: {len(calls)} stops in {len(entered)} files, {len(up)} climbs; entered most: "
          + ", ".join(f"{m} {n}" for m, n in entered.most_common(6)))
    print("  climbs (from the stop before, to the call made higher up): "
          + "; ".join(f"{a} -> {c} > {b}" for a, (c, b) in up))
    stops = route.file_stops
    climbs = [(a, b) for a, b in zip(stops, stops[1:], strict=False) if rank(b) < rank(a)]
    entered = Counter(stops)
    print(f"{title}, the calls that take a run's file (by module): {len(stops)} stops in {len(entered)} files, "
          f"{len(climbs)} climbs; entered most: " + ", ".join(f"{m} {n}" for m, n in entered.most_common(6)))
    print("  route: " + " > ".join(stops))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=int, default=20)
    args = p.parse_args()
    ranks = layer_ranks()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        images(work / "in", args.images)
        base = ["classify", str(work / "in"), "-m", args.model, "-o", str(work / "p.csv"), "--workers", "1", "-q",
                "--report", str(work / "r.html")]
        names = run_file_names(work / "p.csv", work / "r.html")
        show("fresh run", trace(base, names), ranks)
        show("--resume of the finished output", trace([*base[:-2], "--resume"], names), ranks)


if __name__ == "__main__":
    main()
