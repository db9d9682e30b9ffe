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
from fmnist_onnx.runtime import PROVIDERS, open_session
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


def bench_classify(
    folder: str | Path,
    model: str | Path,
    workers: int | None = None,
    provider: str = "auto",
    batch_size: int = 512,
    repeats: int = 1,
    on_record: Callable[[PipelineRecord], None] | None = None,
    clock: Clock = time.perf_counter,
) -> dict:
    """The classify pipeline (find, decode, infer, write) beside decoding alone and the naive loop, on the
    same folder, best of ``repeats`` each (timed with ``clock``). Every file is read once first, so that all
    find a warm page cache.

    UserError for a missing folder, a folder with no images, or a missing or wrong model."""
    from fmnist_onnx import classify as cl
    from fmnist_onnx import images
    from fmnist_onnx.engines.local import default_workers

    folder, model = Path(folder), Path(model)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    prov = open_session(model, provider).provider  # one line for a missing or wrong model, or provider
    paths = [f.path for f in images.iter_files([folder]) if f.kind == "file"]
    if not paths:
        raise UserError(f"{folder}: no image files in it (looked for {', '.join(sorted(images.image_extensions())[:6])}"
                        ", ...)")
    for p in paths:  # warm the page cache: every contender reads from memory
        with contextlib.suppress(OSError):
            Path(p).read_bytes()
    workers = workers or default_workers()
    n = len(paths)
    records: list[PipelineRecord] = []
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as tmp:
        work = Path(tmp)

        def pipeline() -> None:
            cl.classify([folder], model, work / "classify.csv", batch_size=batch_size, workers=workers,
                        provider=prov, overwrite=True)

        plan = [
            (f"classify pipeline (find, decode, infer, write; {workers} processes)", workers, pipeline),
            (f"decode alone ({workers} processes)", workers, lambda: _decode_chunks(paths, workers)),
            ("decode alone (1 process)", 1, lambda: _decode_chunks(paths, 1)),
            ("naive loop (1 process, Pillow, batches of 256)", 1,
             lambda: naive_loop(paths, model, work / "naive.csv", prov)),
        ]
        for what, procs, run in plan:
            best = best_of(run, repeats, clock)
            rec = PipelineRecord(what, n, procs, best, n / best)
            records.append(rec)
            if on_record:
                on_record(rec)
    pipe, decode, naive = records[0], records[1], records[3]
    return {"machine": machine_info(), "folder": str(folder), "images": n, "model": str(model), "provider": prov,
            "workers": workers, "repeats": repeats, "results": [asdict(r) for r in records],
            "pipeline_pct_of_decode": 100 * pipe.images_per_s / decode.images_per_s,
            "pipeline_over_naive": pipe.images_per_s / naive.images_per_s}


def format_classify(result: dict) -> str:
    lines = [f"{result['images']:,} image files in {result['folder']} (provider {result['provider']}, "
             f"best of {result['repeats']}):", f"  {'what':<62} {'images/s':>10} {'seconds':>8}"]
    for r in result["results"]:
        lines.append(f"  {r['what']:<62} {r['images_per_s']:>10,.0f} {r['seconds']:>8.2f}")
    lines.append(f"the pipeline runs at {result['pipeline_pct_of_decode']:.0f}% of decoding alone with the same "
                 f"processes, {result['pipeline_over_naive']:.1f}x the naive loop")
    return "\n".join(lines)
