"""`fmnist-onnx bench`: onnxruntime (fp32, int8; fp16 and IO binding on CUDA) beside PyTorch eager, side by side.

Every (backend, provider, precision, batch size) is timed by the harness of timing.py: the first run apart,
a warm-up, then per-call times for ``duration_s``; ``images_per_s = batch_size / mean latency`` (all images
over the summed time of the timed calls). Every backend gets the same input: seeded uniform noise in [0, 1],
sliced to the batch size.

The achieved GFLOP/s (one forward is spec.FLOPS_PER_IMAGE = 1.34 MFLOP; for int8, GOP/s of int8 products) is
set against the matrix-product peak of the same provider and precision, measured at the start with the same
thread count (peak.py): fp32 rows against the fp32 peak, int8 rows against the int8 peak; fp16 rows get no
percentage, as no fp16 peak is measured.

By default a bounded run (DEFAULT_BATCH_SIZES, DEFAULT_DURATION_S: a third of the full sweep's time; each row
is to be within 5% of the full sweep's, which benchmarks/bench_default.py checks); bench --full is the whole
sweep (FULL_*). The CPU time other processes used meanwhile (machine.py's busy_between) goes beside the
figures: a figure from a busy machine is lower, and says so.

The other parts live apart: machine.py (what the figures were measured on), timing.py (the harness), peak.py
(the matrix-product peaks), bench_pipeline.py (`bench classify`). torch is imported only for the PyTorch
backend: the onnxruntime benchmarks run where only onnxruntime and numpy are.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fmnist_onnx.bench_pipeline import bench_classify, format_classify  # noqa: F401 - `bench classify`'s API
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import atomic_write_text
from fmnist_onnx.info import is_int8
from fmnist_onnx.machine import busy_between, busy_line, cpu_times, machine_info
from fmnist_onnx.peak import FULL_PEAK_SIZES, PEAK_SIZES, Peak, matmul_peak  # noqa: F401 - FULL_*: bench --full
from fmnist_onnx.runtime import PROVIDER_TABLE, PROVIDERS, Session, available_providers, open_session, resolve_provider
from fmnist_onnx.spec import FLOPS_PER_IMAGE, IMAGE_SIZE, NUM_CLASSES
from fmnist_onnx.timing import Clock, LatencyMs, Runner, latency_ms, time_runner

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 64, 1024)  # latency, a mid batch, throughput: the default run stays short
DEFAULT_DURATION_S = 1.0
FULL_BATCH_SIZES = (1, 8, 64, 256, 1024)  # bench --full: the whole sweep
FULL_DURATION_S = 2.0
SEED = 0


@dataclass
class BenchRecord:
    """One measured option. ``images_per_s == batch_size * 1000 / latency_ms.mean`` by construction."""

    backend: str  # "onnxruntime" | "torch"
    provider: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "int8" | "fp16"
    batch_size: int
    images_per_s: float
    latency_ms: LatencyMs
    first_run_ms: float  # session creation (or weights load) + first inference, left out of everything above
    gflops: float  # for int8: GOP/s
    roofline_pct: float | None  # of the matrix-product peak of this provider and precision; None: no such peak
    runs: int  # timed calls behind the percentiles
    io_binding: bool = False  # input and output stay on the device (onnxruntime on CUDA)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.provider} {self.precision}" + (" iobinding" if self.io_binding else "")


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    peaks: dict[tuple[str, str], Peak]  # (provider, precision) -> its matrix-product peak
    results: list[BenchRecord]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """machine.peak holds the fp32 peak of each provider, machine.peak_int8 the int8 ones."""
        machine = dict(self.machine)
        for (provider, precision), p in self.peaks.items():
            key = "peak" if precision == "fp32" else f"peak_{precision}"
            machine.setdefault(key, {})[provider] = dict(asdict(p), roofline_images_per_s=p.roofline_images_per_s)
        return {"machine": machine, "settings": self.settings, "notes": self.notes,
                "results": [asdict(r) for r in self.results]}


@dataclass
class Candidate:
    """One option to measure: ``make(batch)`` creates the session (or loads the model) for that batch."""

    backend: str
    provider: str
    precision: str
    make: Callable[[np.ndarray], Runner]
    io_binding: bool = False


def measure(cand: Candidate, batch: np.ndarray, duration_s: float, peak: Peak | None,
            warmup_s: float | None = None, clock: Clock = time.perf_counter) -> BenchRecord:
    """One record: the first run timed apart (creation + first call), then the timed calls (timing.py)."""
    first_s, times = time_runner(lambda: cand.make(batch), duration_s, warmup_s, clock)
    lat = latency_ms(times)
    ips = len(batch) * 1e3 / lat.mean
    gflops = ips * FLOPS_PER_IMAGE / 1e9
    pct = 100.0 * gflops / peak.gflops if peak is not None else None
    return BenchRecord(cand.backend, cand.provider, cand.precision, len(batch), ips, lat, first_s * 1e3, gflops,
                       pct, len(times), cand.io_binding)


def make_input(batch_size: int, seed: int = SEED) -> np.ndarray:
    """The input every backend gets: seeded uniform noise in [0, 1], [N, 1, 28, 28] float32 (C order)."""
    return np.random.default_rng(seed).random((batch_size, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


# ------------------------------------------------------------------------------------------ candidates

def _ort_candidate(model: Path, provider: str, precision: str, threads: int | None, io_binding: bool = False):
    def make(batch: np.ndarray) -> Runner:
        s = open_session(model, provider, threads, spin=True)
        x = batch.astype(np.float16) if s.input_type == "tensor(float16)" else batch
        if io_binding:
            import onnxruntime as ort

            device = PROVIDER_TABLE[provider].device
            binding = s.session.io_binding()
            binding.bind_ortvalue_input(s.input_name, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
            binding.bind_ortvalue_output(s.output_name, ort.OrtValue.ortvalue_from_shape_and_type(
                [len(x), NUM_CLASSES], x.dtype.type, device, 0))
            return Runner(lambda: s.session.run_with_iobinding(binding))
        feed, names = {s.input_name: x}, [s.output_name]
        return Runner(lambda: s.session.run(names, feed))

    return Candidate("onnxruntime", provider, precision, make, io_binding)


def _torch_candidate(weights: Path, provider: str, threads: int | None) -> Candidate:
    def make(batch: np.ndarray) -> Runner:
        import torch

        from fmnist_onnx.model import load_model

        if threads:
            torch.set_num_threads(threads)
        model = load_model(weights, provider)
        x = torch.from_numpy(batch).to(provider)
        if provider == "cuda":
            def run():
                model(x)
                torch.cuda.synchronize()
        else:
            def run():
                model(x)
        return Runner(run, context=torch.inference_mode)

    return Candidate("torch", provider, "fp32", make)


def int8_beside(model: Path) -> Path:
    """Where export puts the int8 model: model.onnx -> model.int8.onnx."""
    from fmnist_onnx.export import int8_path

    return int8_path(model)


def model_precision(model: Path, session: Session) -> str:
    if is_int8(model):
        return "int8"
    return "fp16" if session.input_type == "tensor(float16)" else "fp32"


def _fp16_model(model: Path, out: Path) -> Path:
    """model.onnx with float16 weights and input/output (onnxruntime's own converter, shipped with it)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from fmnist_onnx.export import save_model

    save_model(convert_float_to_float16(onnx.load(str(model)), keep_io_types=False), out)
    return out


def _int8_model(model: Path, work: Path, notes: list[str]) -> Path | None:
    """The .int8.onnx beside ``model``, else one quantized now as export would (static, calibrated on training
    images), else, where that cannot run (no torch or no dataset for the calibration), dynamic int8; None
    where onnxruntime.quantization cannot run at all (no onnx package)."""
    from fmnist_onnx.export import DEFAULT_INT8_METHOD, quantize_int8

    beside = int8_beside(model)
    if beside.is_file():
        path = beside
    else:
        path, method = work / beside.name, DEFAULT_INT8_METHOD
        try:
            quantize_int8(model, path, method=method)
        except (ImportError, UserError) as e:
            log.info("%s int8 quantization is not possible here (%s): dynamic instead", method, e)
            method = "dynamic"
            try:
                quantize_int8(model, path, method=method)
            except ImportError as e:
                notes.append(f"no {beside.name} beside the model, and none can be made here ({e}): int8 skipped")
                return None
        notes.append(f"no {beside.name} beside the model: quantized on the fly ({method} int8)")
    meta = open_session(path, "cpu").metadata
    notes.append(f"int8 model {path.name}: {meta.get('quantization', 'quantization method not recorded')}")
    return path


def torch_missing() -> str | None:
    """Why the PyTorch backend cannot run here, or None."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"torch is not installed ({e}); the PyTorch eager backend is skipped"
    return None


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """['auto'] (or nothing) -> cpu, plus cuda where onnxruntime has it; explicit names must be available."""
    out: list[str] = []
    for name in requested or ("auto",):
        if name.lower() == "auto":
            resolve_provider("auto")  # validates onnxruntime is importable
            picks = ["cpu"] + (["cuda"] if PROVIDERS["cuda"] in available_providers() else [])
        else:
            picks = [resolve_provider(name)]
        out += [p for p in picks if p not in out]
    return out


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]; anything but positive integers is a UserError."""
    sizes = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"--batch-sizes: {part!r} is not a positive integer (give e.g. 1,8,64,256,1024)")
        sizes.append(int(part))
    return sorted(set(sizes))


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as d:
        yield Path(d)


def _candidates(model: Path, precision: str, weights: Path | None, names: list[str], threads: int | None,
                int8: bool, work: Path, notes: list[str], say: Callable[[str], None]) -> list[Candidate]:
    cands: list[Candidate] = []
    for prov in names:
        cands.append(_ort_candidate(model, prov, precision, threads))
        if prov == "cpu" and int8 and precision == "fp32":
            if not int8_beside(model).is_file():
                say(f"quantizing {model.name} to int8 (no {int8_beside(model).name} beside it)")
            int8_model = _int8_model(model, work, notes)
            if int8_model is not None:
                cands.append(_ort_candidate(int8_model, prov, "int8", threads))
        if PROVIDER_TABLE[prov].io_binding and precision == "fp32":
            cands.append(_ort_candidate(model, prov, "fp32", threads, io_binding=True))
        if PROVIDER_TABLE[prov].fp16 and precision == "fp32":
            cands.append(_ort_candidate(_fp16_model(model, work / "model.fp16.onnx"), prov, "fp16", threads))
        if weights is not None:
            if prov == "cuda" and not _torch_has_cuda():
                notes.append("torch here has no CUDA: the PyTorch eager backend runs on the CPU only")
            else:
                cands.append(_torch_candidate(weights, prov, threads))
    if "cuda" in names and int8:
        notes.append("int8 (dynamic quantization) is measured on the CPU only: it is a CPU technique")
    return cands


def run_benchmark(
    model: str | Path,
    weights: str | Path | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    providers: Sequence[str] = ("auto",),
    threads: int | None = None,
    duration_s: float = DEFAULT_DURATION_S,
    int8: bool = True,
    on_record: Callable[[BenchRecord], None] | None = None,
    *,
    peak_sizes: Sequence[int] = PEAK_SIZES,
    torch_int8_peak: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every option side by side (see the module docstring) and return the records. ``on_progress``
    gets a line as each step starts (a peak, an option's batch sizes); ``on_record`` each record when measured.

    UserError for a missing or wrong model, a provider that is not there, or a batch size < 1.
    """
    say = on_progress or (lambda line: log.info("%s", line))
    model = Path(model)
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("batch sizes must be integers >= 1")
    if not duration_s > 0:
        raise UserError("--duration must be > 0 seconds")
    names = resolve_providers(providers)
    # Fail now, with one line, for a missing or wrong model or a provider that cannot run it.
    sessions = [open_session(model, name, threads) for name in names]
    precision = model_precision(model, sessions[0])
    del sessions
    notes: list[str] = []
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise UserError(f"weights file not found: {weights}")
        missing = torch_missing()
        if missing:
            notes.append(missing)
            weights = None

    report = BenchReport(machine_info(), {"model": str(model), "weights": str(weights) if weights else None,
                                           "batch_sizes": list(batch_sizes), "providers": names, "threads": threads,
                                           "duration_s": duration_s, "input": f"uniform [0, 1), seed {SEED}",
                                           "peak_sizes": list(peak_sizes), "torch_int8_peak": torch_int8_peak},
                         {}, [], notes)
    before = cpu_times()
    with _workdir() as work:
        cands = _candidates(model, precision, weights, names, threads, int8, work, notes, say)
        _peaks(report, cands, names, threads, duration_s, peak_sizes, torch_int8_peak, weights is not None, say)
        x = make_input(max(batch_sizes))
        for cand in cands:  # torch comes last per provider: its OpenMP threads spin a while after each call
            say(f"measuring {_label(cand)} at batch {', '.join(map(str, batch_sizes))}")
            for bs in batch_sizes:
                rec = measure(cand, x[:bs], duration_s, report.peaks.get((cand.provider, cand.precision)))
                report.results.append(rec)
                if on_record:
                    on_record(rec)
                gc.collect()  # drop the session (and its thread pool) before the next one starts
    report.machine["busy"] = busy_between(before, cpu_times())
    return report


def _label(cand: Candidate) -> str:
    return f"{cand.backend} {cand.provider} {cand.precision}" + (" iobinding" if cand.io_binding else "")


def _peaks(report: BenchReport, cands: list[Candidate], names: list[str], threads: int | None, duration_s: float,
           sizes: Sequence[int], torch_int8: bool, with_torch: bool, say: Callable[[str], None]) -> None:
    """The fp32 peak of every provider; the int8 one where int8 rows run on the CPU; none for fp16 (no
    percentage there). torch.mm joins the fp32 peak only where the PyTorch backend runs (``with_torch``)."""
    wanted = [(p, "fp32") for p in names] + [(c.provider, "int8") for c in cands if c.precision == "int8"]
    for prov, prec in dict.fromkeys(wanted):
        if prec == "int8" and prov != "cpu":
            continue
        say(f"measuring the {prov} {prec} matrix-product peak")
        report.peaks[prov, prec] = matmul_peak(prov, prec, threads, duration_s=min(1.5, max(0.3, duration_s)),
                                               sizes=sizes, torch_int8=torch_int8, with_torch=with_torch)


# ------------------------------------------------------------------------------------------ rendering

def fastest_per_batch(records: Sequence[BenchRecord]) -> dict[int, BenchRecord]:
    best: dict[int, BenchRecord] = {}
    for r in records:
        if r.batch_size not in best or r.images_per_s > best[r.batch_size].images_per_s:
            best[r.batch_size] = r
    return best


def format_table(report: BenchReport) -> str:
    """The terminal table: grouped by batch size, the fastest option of each marked with '*'."""
    best = fastest_per_batch(report.results)
    head = (f"{'batch':>5}  {'option':<33} {'images/s':>11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'min ms':>8} {'max ms':>8} {'first ms':>9} {'GFLOP/s':>8} {'roofline':>8}")
    lines = [line] if (line := busy_line(report.machine.get("busy"))) else []
    for (prov, prec), p in report.peaks.items():
        unit = "GOP/s" if prec == "int8" else "GFLOP/s"
        detail = ", ".join(f"{k} {v:.0f}" for k, v in p.by_method.items())
        if prec == "int8" and "torch" not in p.by_method and not report.settings.get("torch_int8_peak", True):
            detail += "; torch._int_mm not measured: --torch-int8-peak"
        lines.append(f"{prov} {prec} matmul peak {p.gflops:.0f} {unit} ({detail}; best at {p.size}x{p.size}; "
                     f"threads {p.threads or 'default'}) -> {prec} roofline {p.roofline_images_per_s:,.0f} images/s")
    lines += [head, "-" * len(head)]
    for bs in sorted(best):
        for r in (r for r in report.results if r.batch_size == bs):
            mark = "*" if r is best[bs] else " "
            lat = r.latency_ms
            pct = f"{r.roofline_pct:>7.0f}%" if r.roofline_pct is not None else f"{'-':>8}"
            lines.append(f"{bs:>5} {mark}{r.label:<33} {r.images_per_s:>11,.0f} {lat.p50:>8.3f} {lat.p90:>8.3f} "
                         f"{lat.p99:>8.3f} {lat.min:>8.3f} {lat.max:>8.3f} {r.first_run_ms:>9.1f} "
                         f"{r.gflops:>8.1f} {pct}")
    lines.append("* fastest at that batch size; first ms = session creation + first inference, excluded from the rest")
    lines.append("roofline = % of the matrix-product peak in the row's own precision (int8 rows: of the int8 peak, "
                 "GFLOP/s read as GOP/s); - = no peak measured for that precision")
    return "\n".join(lines)


def save_json(data: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``data`` as indented JSON, atomically (temp file, then rename); an existing file only with
    ``overwrite``."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n", overwrite)
