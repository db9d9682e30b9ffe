"""`fmnist-onnx bench classify`: the whole classify pipeline on a folder, beside decoding alone and the naive loop.

Each contender runs over the same folder from start to end (process starts included), best of ``repeats``
(timing.best_of); the result says how close the pipeline runs to its decoding limit. No torch here.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fmnist_onnx.errors import UserError
from fmnist_onnx.machine import machine_info
from fmnist_onnx.runtime import PROVIDERS, open_session, resolve_provider
from fmnist_onnx.spec import IMAGE_SIZE
from fmnist_onnx.timing import Clock, best_of


@dataclass
class PipelineRecord:
    """One way through a folder of images, timed from start to end (process starts included)."""

    what: str
    images: int
    processes: int
    seconds: float
    images_per_s: float


def _decode_chunks(paths: list[str], workers: int, chunk: int = 1024) -> None:
    """Decode alone: classify's own decoding (images.preprocess_batch) in ``workers`` forked processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from fmnist_onnx import images

    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    if workers == 1:
        for c in chunks:
            images.preprocess_batch(c)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        for _ in pool.map(images.preprocess_batch, chunks):
            pass


def naive_loop(paths: Sequence[str], model: Path, output: Path, provider: str = "cpu") -> None:
    """The loop a user writes first: one process, Pillow, batches of 256, onnxruntime, a CSV of path,label."""
    import csv

    import onnxruntime as ort
    from PIL import Image

    from fmnist_onnx.spec import CLASSES

    sess = ort.InferenceSession(str(model), providers=[PROVIDERS[provider]])
    name = sess.get_inputs()[0].name
    with open(output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i in range(0, len(paths), 256):
            batch, xs = [], []
            for p in paths[i:i + 256]:
                try:
                    im = Image.open(p).convert("L")
                except Exception:  # noqa: BLE001 - the naive loop skips what Pillow cannot open
                    continue
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    im = im.resize((IMAGE_SIZE, IMAGE_SIZE))
                xs.append(np.asarray(im, dtype=np.float32) / 255.0)
                batch.append(p)
            if xs:
                logits = sess.run(None, {name: np.stack(xs)[:, None]})[0]
                w.writerows((p, CLASSES[k]) for p, k in zip(batch, logits.argmax(1), strict=True))


_COORDINATOR = """
import json, resource, sys
from fmnist_onnx.classify import classify
folder, model, out, workers, provider, batch, inference = sys.argv[1:8]
s = classify([folder], model, out, overwrite=True, workers=int(workers), provider=provider,
             batch_size=int(batch) if batch != "-" else None, inference=inference)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": r.ru_utime + r.ru_stime, "files": s.files}))
"""


def coordinator_cpu(folder: Path, model: Path, workers: int, provider: str, batch_size: int | None,
                    work: Path, inference: str = "auto") -> dict:
    """The CPU time of the process that walks and writes (its own, not its workers'), from two fresh runs:
    one file (start-up: interpreter, imports, pool, session) and the whole folder; the difference per file
    is the coordinator's cost, and 1 / that cost the ceiling of any number of cores."""
    import json
    import subprocess
    import sys

    one = work / "one"
    one.mkdir()
    first = next(images_under(folder))
    (one / Path(first).name).write_bytes(Path(first).read_bytes())

    def run(where: Path) -> dict:
        proc = subprocess.run([sys.executable, "-c", _COORDINATOR, str(where), str(model), str(work / "c.csv"),
                               str(workers), provider, str(batch_size or "-"), inference], capture_output=True,
                              text=True)
        if proc.returncode not in (0, 3):
            raise UserError(f"the coordinator run failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    start, full = run(one), run(folder)
    us = 1e6 * max(0.0, full["cpu_s"] - start["cpu_s"]) / max(1, full["files"] - 1)
    return {"startup_cpu_s": round(start["cpu_s"], 3), "cpu_us_per_file": round(us, 2),
            "ceiling_images_per_s": round(1e6 / us) if us > 0 else None, "files": full["files"]}


def images_under(folder: Path):
    from fmnist_onnx.classify.sources.folder import walk_batches

    for batch in walk_batches([str(folder)], True):
        yield from batch.files


def scaling_workers(cores: int) -> list[int]:
    """1, 2, 4, ... up to the core count, and the core count itself."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return [*counts, cores]


def _inputs(folder: Path, model: Path, provider: str) -> tuple[str, list[str]]:
    """The provider resolved and the folder's image files, each read once (every contender then reads from a
    warm page cache). One line for a missing folder, one without images, a missing or wrong model, or a
    provider that is missing."""
    from fmnist_onnx import images

    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    # The model is opened on the CPU: CUDA started in this process would not work in the processes that classify
    # forks from it.
    prov = resolve_provider(provider)
    open_session(model, "cpu")
    paths = list(images_under(folder))
    if not paths:
        raise UserError(f"{folder}: no image files in it (looked for {', '.join(sorted(images.image_extensions())[:6])}"
                        ", ...)")
    for p in paths:
        with contextlib.suppress(OSError):
            Path(p).read_bytes()
    return prov, paths


def bench_classify(
    folder: str | Path,
    model: str | Path,
    workers: int | None = None,
    provider: str = "auto",
    batch_size: int | None = None,
    repeats: int = 1,
    on_record: Callable[[PipelineRecord], None] | None = None,
    clock: Clock = time.perf_counter,
    scaling: bool = False,
    coordinator: bool = True,
    inference: str = "auto",
) -> dict:
    """The classify pipeline (find, decode, infer, write) beside decoding alone and the naive loop, on the
    same folder, best of ``repeats`` each (timed with ``clock``). Every file is read once first, so that all
    find a warm page cache. ``scaling``: the pipeline also with 1, 2, 4, ... workers up to ``workers``.
    ``coordinator``: the CPU cost of the process that walks and writes (``coordinator_cpu``). ``inference``:
    classify's --inference. UserError for a missing folder, a folder with no images, a missing or wrong model."""
    from fmnist_onnx import classify as cl
    from fmnist_onnx.classify.engines.local import default_workers

    folder, model = Path(folder), Path(model)
    prov, paths = _inputs(folder, model, provider)
    workers = workers or default_workers()
    n = len(paths)
    records: list[PipelineRecord] = []
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as tmp:
        work = Path(tmp)

        def pipeline() -> None:
            cl.classify([folder], model, work / "classify.csv", batch_size=batch_size, workers=workers,
                        provider=prov, overwrite=True, inference=inference)

        def record(what: str, procs: int, run: Callable[[], object]) -> PipelineRecord:
            best = best_of(run, repeats, clock)
            rec = PipelineRecord(what, n, procs, best, n / best)
            if on_record:
                on_record(rec)
            return rec

        records += [
            record(f"classify pipeline (find, decode, infer, write; {workers} processes)", workers, pipeline),
            record(f"decode alone ({workers} processes)", workers, lambda: _decode_chunks(paths, workers)),
            record("decode alone (1 process)", 1, lambda: _decode_chunks(paths, 1)),
        ]
        curve = [asdict(record(f"classify pipeline ({w} processes)", w, lambda w=w: cl.classify([folder], model,
            work / "scaling.csv", batch_size=batch_size, workers=w, provider=prov, overwrite=True, inference=inference)
        ))
            for w in (scaling_workers(workers) if scaling else [])]
        # last: the naive loop runs the model in this process (CUDA started here, no pipeline could fork after it)
        records.append(record("naive loop (1 process, Pillow, batches of 256)", 1,
                              lambda: naive_loop(paths, model, work / "naive.csv", prov)))
        coord = coordinator_cpu(folder, model, workers, prov, batch_size, work, inference) if coordinator else None
    pipe, decode, naive = records[0], records[1], records[3]
    return {"machine": machine_info(), "folder": str(folder), "images": n, "model": str(model), "provider": prov,
            "inference": inference, "workers": workers, "repeats": repeats, "results": [asdict(r) for r in records],
            "pipeline_pct_of_decode": 100 * pipe.images_per_s / decode.images_per_s,
            "pipeline_over_naive": pipe.images_per_s / naive.images_per_s, "scaling": curve,
            "coordinator": coord}


def format_classify(result: dict) -> str:
    inference = f", inference {result['inference']}" if result.get("inference", "auto") != "auto" else ""
    lines = [f"{result['images']:,} image files in {result['folder']} (provider {result['provider']}{inference}, "
             f"best of {result['repeats']}):", f"  {'what':<62} {'images/s':>10} {'seconds':>8}"]
    for r in result["results"]:
        lines.append(f"  {r['what']:<62} {r['images_per_s']:>10,.0f} {r['seconds']:>8.2f}")
    lines.append(f"the pipeline runs at {result['pipeline_pct_of_decode']:.0f}% of decoding alone with the same "
                 f"processes, {result['pipeline_over_naive']:.1f}x the naive loop")
    if result.get("scaling"):
        lines.append("scaling: " + ", ".join(f"{r['processes']} -> {r['images_per_s']:,.0f}" for r in result["scaling"])
                     + " images/s")
    c = result.get("coordinator")
    if c:
        ceiling = f"{c['ceiling_images_per_s']:,} images/s" if c["ceiling_images_per_s"] else "none measured"
        lines.append(f"coordinator (the process that walks and writes): {c['cpu_us_per_file']:.2f} us of CPU per "
                     f"file after {c['startup_cpu_s']:.2f} CPU-s of start-up; ceiling {ceiling}")
    return "\n".join(lines)
