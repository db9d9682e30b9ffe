"""Inference benchmarks: onnxruntime (fp32, int8; fp16 and IO binding on CUDA) beside PyTorch eager.

Method, the same for every (backend, provider, precision, batch size):
1. the first run (session creation or model load, plus the first inference) is timed on its own and reported
   apart, never mixed into the figures below;
2. warm-up calls for a quarter of the duration (at most 0.5 s);
3. timed calls, one ``perf_counter`` pair around each, until ``duration_s`` has passed (at least 5 calls).
   Latency percentiles come from those per-call times, and ``images_per_s = batch_size / mean latency``
   (equivalently: all images / the summed time of the timed calls).

Every backend gets the same input: seeded uniform noise in [0, 1], sliced to the batch size. The achieved
GFLOP/s (one forward is spec.FLOPS_PER_IMAGE = 1.34 MFLOP) is set against a float32 matrix-product peak
measured at the start of the run with the same thread count: the best call of onnxruntime's own MatMul and
torch's (numpy's too when the thread count is the machine's, since numpy's BLAS threads cannot be set here) on
square matrices of 512, 1024 and 2048. The roofline is that peak / 1.34 MFLOP images per second; int8 can pass
it, it is an fp32 roofline.

torch is imported only for the PyTorch backend (and the torch matrix product, where installed): the
onnxruntime benchmarks run where only onnxruntime and numpy are.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fmnist_onnx import __version__
from fmnist_onnx.errors import UserError
from fmnist_onnx.runtime import PROVIDERS, available_providers, open_session, resolve_provider
from fmnist_onnx.spec import FLOPS_PER_IMAGE, IMAGE_SIZE

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 8, 64, 256, 1024)
MIN_RUNS = 5
SEED = 0
# Square float32 matrices for the peak. The best of several sizes: big ones reach the BLAS peak on a quiet
# machine; on a busy one only short calls (512: ~1 ms) find the cores free, and the best call is what counts.
PEAK_SIZES = (512, 1024, 2048)


@dataclass
class LatencyMs:
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    mean: float


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
    gflops: float
    roofline_pct: float  # of the fp32 matrix-product peak of this provider
    runs: int  # timed calls behind the percentiles
    io_binding: bool = False  # input and output stay on the device (onnxruntime on CUDA)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.provider} {self.precision}" + (" iobinding" if self.io_binding else "")


@dataclass
class Peak:
    """The float32 matrix-product peak of one provider, and how it was measured."""

    provider: str
    gflops: float
    method: str  # which library gave the best figure
    threads: int | None  # None: the libraries' defaults
    by_method: dict[str, float] = field(default_factory=dict)  # each library's best, over the sizes
    size: int = 0  # the matrix size of the best figure

    @property
    def roofline_images_per_s(self) -> float:
        return self.gflops * 1e9 / FLOPS_PER_IMAGE


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    peaks: dict[str, Peak]
    results: list[BenchRecord]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        peaks = {name: dict(asdict(p), roofline_images_per_s=p.roofline_images_per_s) for name, p in self.peaks.items()}
        return {"machine": dict(self.machine, peak=peaks), "settings": self.settings, "notes": self.notes,
                "results": [asdict(r) for r in self.results]}


# ------------------------------------------------------------------------------------------ the machine

def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if flags and name:
                break
    except OSError:
        pass
    return name, flags


def _gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def library_versions() -> dict[str, str]:
    """Versions of what the figures depend on, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"fmnist_onnx": __version__, "python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine_info() -> dict:
    """What a figure needs beside it to mean anything: CPU, cores, memory, GPU, library versions, providers."""
    cpu, flags = _cpuinfo()
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # The instruction sets that decide the fp32 and int8 figures (VNNI: fast int8 dot products; AMX: tiles).
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
            if f in flags]
    try:  # other work on the same cores skews every figure: say how busy the machine was
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": memory_gib,
            "cpu_flags": simd, "gpus": _gpu_names(), "platform": platform.platform(),
            "versions": library_versions(), "providers": available_providers(), "load_average": load,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ------------------------------------------------------------------------------------------ measuring

def time_calls(run: Callable[[], object], duration_s: float, warmup_s: float | None = None) -> np.ndarray:
    """Seconds of each timed call of ``run`` after a warm-up: calls go on until ``duration_s`` has passed and
    at least MIN_RUNS were timed. The garbage collector is paused meanwhile, as timeit does."""
    warmup_s = min(0.5, duration_s / 4) if warmup_s is None else warmup_s
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        end, n = clock() + warmup_s, 0
        while n < 2 or clock() < end:
            run()
            n += 1
        times: list[float] = []
        start = clock()
        while True:
            t0 = clock()
            run()
            t1 = clock()
            times.append(t1 - t0)
            if t1 - start >= duration_s and len(times) >= MIN_RUNS:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return np.asarray(times)


def latency_ms(seconds: np.ndarray) -> LatencyMs:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyMs(p50=float(p50), p90=float(p90), p99=float(p99), min=float(ms.min()), max=float(ms.max()),
                     mean=float(ms.mean()))


@dataclass
class Runner:
    """A ready-to-call inference on one prepared batch; ``context`` is held around all the calls
    (torch.inference_mode for PyTorch: entering it per call would bill its cost to the model)."""

    run: Callable[[], object]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    close: Callable[[], None] = lambda: None


@dataclass
class Candidate:
    """One option to measure: ``make(batch)`` creates the session (or loads the model) for that batch."""

    backend: str
    provider: str
    precision: str
    make: Callable[[np.ndarray], Runner]
    io_binding: bool = False


def measure(cand: Candidate, batch: np.ndarray, duration_s: float, peak: Peak,
            warmup_s: float | None = None) -> BenchRecord:
    """First run timed apart (creation + first call), then the timed calls (see the module docstring)."""
    t0 = time.perf_counter()
    runner = cand.make(batch)
    with runner.context():
        runner.run()
        first_s = time.perf_counter() - t0
        times = time_calls(runner.run, duration_s, warmup_s)
    runner.close()
    lat = latency_ms(times)
    bs = len(batch)
    ips = bs * 1e3 / lat.mean
    gflops = ips * FLOPS_PER_IMAGE / 1e9
    return BenchRecord(cand.backend, cand.provider, cand.precision, bs, ips, lat, first_s * 1e3, gflops,
                       100.0 * gflops / peak.gflops, len(times), cand.io_binding)


def make_input(batch_size: int, seed: int = SEED) -> np.ndarray:
    """The input every backend gets: seeded uniform noise in [0, 1], [N, 1, 28, 28] float32 (C order)."""
    return np.random.default_rng(seed).random((batch_size, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


# ------------------------------------------------------------------------------------------ matrix peak

def _best_gflops(run: Callable[[], object], flop: float, duration_s: float) -> float:
    times = time_calls(run, duration_s, warmup_s=0.0)
    return flop / float(times.min()) / 1e9


def _matmul_model(n: int, dtype: int):
    from onnx import helper

    g = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul",
                          [helper.make_tensor_value_info("A", dtype, [n, n]),
                           helper.make_tensor_value_info("B", dtype, [n, n])],
                          [helper.make_tensor_value_info("C", dtype, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    return model


def _ort_matmul_gflops(provider: str, threads: int | None, duration_s: float, n: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # No TF32 on CUDA, as runtime.open_session: the roofline of an fp32 model is an fp32 peak.
    providers: list = [(PROVIDERS["cuda"], {"use_tf32": 0})] if provider == "cuda" else [PROVIDERS[provider]]
    sess = ort.InferenceSession(_matmul_model(n, TensorProto.FLOAT).SerializeToString(), opts, providers=providers)
    if sess.get_providers()[0] != PROVIDERS[provider]:  # onnxruntime falls back to the CPU with a mere warning
        raise UserError(f"onnxruntime could not run a MatMul on {PROVIDERS[provider]} (it fell back to the CPU)")
    rng = np.random.default_rng(SEED)
    a, b = (rng.random((n, n), dtype=np.float32) for _ in range(2))
    if provider == "cuda":  # inputs and output on the device, else the copies are what gets timed
        binding = sess.io_binding()
        for name, value in (("A", a), ("B", b)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_ortvalue_output("C", ort.OrtValue.ortvalue_from_shape_and_type([n, n], np.float32, "cuda", 0))
        return _best_gflops(lambda: sess.run_with_iobinding(binding), 2 * n**3, duration_s)
    return _best_gflops(lambda: sess.run(None, {"A": a, "B": b}), 2 * n**3, duration_s)


def _torch_matmul_gflops(provider: str, threads: int | None, duration_s: float, n: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if provider == "cuda" and not torch.cuda.is_available():
        return None
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(SEED)
    a, b = (torch.rand(n, n, generator=g).to(provider) for _ in range(2))

    def run():
        torch.mm(a, b)
        if provider == "cuda":
            torch.cuda.synchronize()

    return _best_gflops(run, 2 * n**3, duration_s)


def matmul_peak(provider: str = "cpu", threads: int | None = None, duration_s: float = 1.0,
                sizes: Sequence[int] = PEAK_SIZES) -> Peak:
    """The float32 matrix-product peak (GFLOP/s) with ``threads``: the best of the libraries at hand, each on
    square matrices of each size in ``sizes``, best call of each."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with_numpy = provider == "cpu" and (threads is None or threads == usable)
    per = max(0.05, duration_s / (len(sizes) * (3 if with_numpy else 2)))
    found: dict[str, float] = {}
    best_size = {}
    for n in sizes:
        got = {"onnxruntime": _ort_matmul_gflops(provider, threads, per, n),
               "torch": _torch_matmul_gflops(provider, threads, per, n)}
        if with_numpy:
            # numpy's BLAS uses every core it sees, and cannot be told otherwise without threadpoolctl.
            rng = np.random.default_rng(SEED)
            a, b = (rng.random((n, n), dtype=np.float32) for _ in range(2))
            got["numpy"] = _best_gflops(lambda a=a, b=b: a @ b, 2 * n**3, per)
        for name, gflops in got.items():
            if gflops is not None and gflops > found.get(name, 0.0):
                found[name], best_size[name] = gflops, n
    method = max(found, key=found.get)
    return Peak(provider, found[method], method, threads, found, best_size[method])


# ------------------------------------------------------------------------------------------ candidates

def _ort_candidate(model: Path, provider: str, precision: str, threads: int | None, io_binding: bool = False):
    def make(batch: np.ndarray) -> Runner:
        s = open_session(model, provider, threads)
        x = batch.astype(np.float16) if s.input_type == "tensor(float16)" else batch
        if io_binding:
            import onnxruntime as ort

            binding = s.session.io_binding()
            binding.bind_ortvalue_input(s.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            out_type = np.float16 if x.dtype == np.float16 else np.float32
            binding.bind_ortvalue_output(s.output_name, ort.OrtValue.ortvalue_from_shape_and_type(
                [len(x), 10], out_type, "cuda", 0))
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


def _model_precision(model: Path) -> str:
    import onnx

    from fmnist_onnx.export import is_quantized

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - open_session gives the user-facing error for unreadable models
        return "fp32"
    if is_quantized(proto):
        return "int8"
    elem = proto.graph.input[0].type.tensor_type.elem_type if proto.graph.input else 1
    return "fp16" if elem == onnx.TensorProto.FLOAT16 else "fp32"


def _fp16_model(model: Path, out: Path) -> Path:
    """model.onnx with float16 weights and input/output (onnxruntime's own converter, shipped with it)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from fmnist_onnx.export import save_model

    save_model(convert_float_to_float16(onnx.load(str(model)), keep_io_types=False), out)
    return out


def torch_missing() -> str | None:
    """Why the PyTorch backend cannot run here, or None."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"torch is not installed ({e}); the PyTorch eager backend is skipped"
    return None


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


def run_benchmark(
    model: str | Path,
    weights: str | Path | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    providers: Sequence[str] = ("auto",),
    threads: int | None = None,
    duration_s: float = 2.0,
    int8: bool = True,
    on_record: Callable[[BenchRecord], None] | None = None,
) -> BenchReport:
    """Measure every option side by side (see the module docstring) and return the records.

    UserError for a missing or wrong model, a provider that is not there, or a batch size < 1.
    """
    model = Path(model)
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("batch sizes must be integers >= 1")
    if not duration_s > 0:
        raise UserError("--duration must be > 0 seconds")
    names = resolve_providers(providers)
    for name in names:  # fail now, with one line, for a missing or wrong model or a provider that cannot run it
        open_session(model, name, threads)
    notes: list[str] = []
    precision = _model_precision(model)
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
                                           "duration_s": duration_s, "input": f"uniform [0, 1), seed {SEED}"},
                         {}, [], notes)
    with _workdir() as work:
        cands: list[Candidate] = []
        for prov in names:
            cands.append(_ort_candidate(model, prov, precision, threads))
            if prov == "cpu" and int8 and precision == "fp32":
                cands.append(_ort_candidate(_int8_model(model, work, notes), prov, "int8", threads))
            if prov == "cuda" and precision == "fp32":
                cands.append(_ort_candidate(model, prov, "fp32", threads, io_binding=True))
                cands.append(_ort_candidate(_fp16_model(model, work / "model.fp16.onnx"), prov, "fp16", threads))
            if weights is not None:
                if prov == "cuda" and not _torch_has_cuda():
                    notes.append("torch here has no CUDA: the PyTorch eager backend runs on the CPU only")
                else:
                    cands.append(_torch_candidate(weights, prov, threads))
        if "cuda" in names and int8:
            notes.append("int8 (dynamic quantization) is measured on the CPU only: it is a CPU technique")
        for prov in names:
            log.info("measuring the %s matrix-product peak", prov)
            report.peaks[prov] = matmul_peak(prov, threads, duration_s=min(1.5, max(0.3, duration_s)))
        x = make_input(max(batch_sizes))
        for cand in cands:  # torch comes last per provider: its OpenMP threads spin a while after each call
            for bs in batch_sizes:
                log.info("measuring %s %s %s batch %d", cand.backend, cand.provider, cand.precision, bs)
                rec = measure(cand, x[:bs], duration_s, report.peaks[cand.provider])
                report.results.append(rec)
                if on_record:
                    on_record(rec)
                gc.collect()  # drop the session (and its thread pool) before the next one starts
    return report


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _int8_model(model: Path, work: Path, notes: list[str]) -> Path:
    """The .int8.onnx beside ``model``, else one quantized now as export would (static, calibrated on training
    images), else, where that cannot run (no torch or no dataset for the calibration), dynamic int8."""
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
            quantize_int8(model, path, method=method)
        notes.append(f"no {beside.name} beside the model: quantized on the fly ({method} int8)")
    meta = open_session(path, "cpu").metadata
    notes.append(f"int8 model {path.name}: {meta.get('quantization', 'quantization method not recorded')}")
    return path


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
    lines = []
    for prov, p in report.peaks.items():
        detail = ", ".join(f"{k} {v:.0f}" for k, v in p.by_method.items())
        lines.append(f"{prov} matmul peak {p.gflops:.0f} GFLOP/s ({detail}; best at {p.size}x{p.size}; "
                     f"threads {p.threads or 'default'}) "
                     f"-> fp32 roofline {p.roofline_images_per_s:,.0f} images/s")
    lines += [head, "-" * len(head)]
    for bs in sorted(best):
        for r in (r for r in report.results if r.batch_size == bs):
            mark = "*" if r is best[bs] else " "
            lat = r.latency_ms
            lines.append(f"{bs:>5} {mark}{r.label:<33} {r.images_per_s:>11,.0f} {lat.p50:>8.3f} {lat.p90:>8.3f} "
                         f"{lat.p99:>8.3f} {lat.min:>8.3f} {lat.max:>8.3f} {r.first_run_ms:>9.1f} "
                         f"{r.gflops:>8.1f} {r.roofline_pct:>7.0f}%")
    lines.append("* fastest at that batch size; first ms = session creation + first inference, excluded from the rest")
    return "\n".join(lines)


def save_json(data: dict, path: str | Path) -> Path:
    """Write ``data`` as indented JSON, atomically (temp file, then rename)."""
    import json

    from fmnist_onnx.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ bench classify

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
) -> dict:
    """The classify pipeline (find, decode, infer, write) beside decoding alone and the naive loop, on the
    same folder, best of ``repeats`` each. Every file is read once first, so that all find a warm page cache.

    UserError for a missing folder, a folder with no images, or a missing or wrong model."""
    from fmnist_onnx import classify as cl
    from fmnist_onnx import images

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
    workers = workers or cl.default_workers()
    n = len(paths)
    records: list[PipelineRecord] = []
    with _workdir() as work:
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
            best = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
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
