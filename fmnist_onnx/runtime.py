"""onnxruntime sessions for this model: provider choice that never falls back silently, and a signature check.

No torch here: classify, info and the onnxruntime benchmarks run where only onnxruntime is installed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fmnist_onnx.errors import UserError
from fmnist_onnx.spec import IMAGE_SIZE, NUM_CLASSES

log = logging.getLogger(__name__)

MODEL_FAILED = 5  # the exit code of a ModelRunError
_ITEM_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(double)": 8, "tensor(bfloat16)": 2,
               "tensor(int64)": 8, "tensor(int32)": 4, "tensor(int8)": 1, "tensor(uint8)": 1}


class ModelRunError(UserError):
    """onnxruntime failed while running the model (out of memory, most likely): one line, exit 5. A caller that
    wrote rows says where they are kept. Made of the message alone, so that it crosses process boundaries
    (pickled by a worker) with its exit code."""

    exit_code = MODEL_FAILED


@dataclass(frozen=True)
class Provider:
    """One ``--provider`` choice: everything the commands need to know about it, in one place."""

    name: str  # what --provider says
    execution_provider: str  # onnxruntime's name
    options: tuple[tuple[str, object], ...]  # the execution provider's options
    model_in_workers: bool  # classify: True, each decoding process runs the model; False, a batched stage does
    io_binding: bool  # inputs and outputs can live on the device (bench times without copies)
    fp16: bool  # fast float16 arithmetic (bench adds fp16 rows)
    device: str  # OrtValue device for IO binding


# The table every --provider choice, classify, bench and verify read. Adding a provider is one entry here.
PROVIDER_TABLE: dict[str, Provider] = {
    # On the CPU the model is cheap beside decoding (13 us of 37 per image): the decoding processes run it,
    # and send back encoded rows, so that the process that writes is never the bottleneck.
    "cpu": Provider("cpu", "CPUExecutionProvider", (), model_in_workers=True, io_binding=False, fp16=False,
                    device="cpu"),
    # On a GPU the model wants big batches: the workers only decode, a batched stage runs it. No TF32: the CUDA
    # provider's TF32 matrix products have about 1e-3 relative error, and fp32 must be fp32.
    "cuda": Provider("cuda", "CUDAExecutionProvider", (("use_tf32", 0),), model_in_workers=False, io_binding=True,
                     fp16=True, device="cuda"),
}
PROVIDER_CHOICES = ("auto", *PROVIDER_TABLE)  # for click.Choice
PROVIDERS = {name: p.execution_provider for name, p in PROVIDER_TABLE.items()}  # name -> execution provider


def session_providers(name: str) -> list:
    """The ``providers`` argument of an InferenceSession for provider ``name`` (CPU after it as onnxruntime's
    fallback for the few operators a device provider lacks)."""
    p = PROVIDER_TABLE[name]
    first = (p.execution_provider, dict(p.options)) if p.options else p.execution_provider
    return [first] + ([PROVIDERS["cpu"]] if name != "cpu" else [])


@dataclass
class Session:
    """An onnxruntime session plus what callers need to know about it."""

    session: object  # onnxruntime.InferenceSession
    provider: str  # "cpu" | "cuda": the provider that actually runs the model
    input_name: str
    output_name: str
    input_type: str  # "tensor(float)" or "tensor(float16)"
    metadata: dict[str, str]
    fixed_batch: int | None = None  # a model exported with a fixed batch size takes exactly that many images

    def run(self, batch, io_binding: bool = False):
        """Logits for a float32 batch [N, 1, 28, 28] as a numpy array [N, 10] (float32), for any N: a model
        with a fixed batch size is run on slices of that size, the last one padded with zeros. ``io_binding``:
        the output is allocated on the provider's device and copied back once (the batched stage's way; on
        the CPU provider it runs the same code, which is how CI tests it)."""
        import numpy as np

        if self.input_type == "tensor(float16)":
            batch = batch.astype(np.float16)
        n = self.fixed_batch
        if n is None or len(batch) == n:
            return self._call(batch, io_binding)
        parts = []
        for i in range(0, len(batch), n):
            part = batch[i:i + n]
            if len(part) < n:
                part = np.concatenate([part, np.zeros((n - len(part), *part.shape[1:]), part.dtype)])
            parts.append(self._call(part, io_binding)[:len(batch) - i])
        return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)

    def _call(self, x, io_binding: bool):
        try:
            return self._call_ort(x, io_binding)
        except MemoryError:
            raise ModelRunError(f"out of memory running the model on a batch of {len(x)} images") from None
        except Exception as e:  # onnxruntime's own exception types (Fail, RuntimeException, ...): one line
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise ModelRunError(f"{_run_failure(e)} running the model on a batch of {len(x)} images") from None

    def _call_ort(self, x, io_binding: bool):
        import numpy as np

        if not io_binding:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        else:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, np.ascontiguousarray(x))
            binding.bind_output(self.output_name, PROVIDER_TABLE[self.provider].device)
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        return out.astype(np.float32, copy=False)


def _run_failure(e: Exception) -> str:
    """onnxruntime's exception in a few words: its messages run to paragraphs of source locations."""
    text = str(e)
    size = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", text)
    if size:
        return f"onnxruntime could not allocate {int(size.group(1)):,} bytes (out of memory)"
    if "bad_alloc" in text:
        return "onnxruntime ran out of memory"
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return f"onnxruntime failed ({first[:200]})"


# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: with both, the files of the one installed
# last win and CUDA is lost (seen on an H100). The extras [cpu] and [gpu] pick one; this is the way back to one.
BOTH_RUNTIMES_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"


@functools.cache  # once per process
def _warn_if_both_runtimes(ort) -> None:
    import multiprocessing
    from importlib.metadata import PackageNotFoundError, distribution

    def installed(name: str) -> bool:
        try:
            return distribution(name) is not None
        except PackageNotFoundError:
            return False

    # Worker processes stay quiet: the command that started them has said it. Nor is there anything to say
    # where the module in use has CUDA (onnxruntime-gpu put first on the path, as benchmarks/gpu.sh does).
    if multiprocessing.parent_process() is None and installed("onnxruntime") and installed("onnxruntime-gpu") \
            and PROVIDERS["cuda"] not in ort.get_available_providers():
        log.warning("both onnxruntime and onnxruntime-gpu are installed (one module, CUDA may be lost); "
                    "keep one: %s", BOTH_RUNTIMES_FIX)


def import_onnxruntime():
    """The onnxruntime module; one clear error where no onnxruntime package is installed (the core install has
    none: [cpu] or [gpu] brings it), and one warning line where both are."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError as e:
        if e.name != "onnxruntime":
            raise
        raise UserError('onnxruntime is not installed: pip install "fmnist-onnx[cpu]", or "fmnist-onnx[gpu]" '
                        "on a machine with CUDA (never both)") from None
    _warn_if_both_runtimes(ort)
    return ort


def available_providers() -> list[str]:
    return import_onnxruntime().get_available_providers()


# classify --provider auto: the static rule. classify is bound by decoding, not by the model (13 us of the 37 us of
# CPU an image costs on the CPU path), so a GPU only helps it where the batched stage feeds it at decoding speed.
# Measured on one H100 with 16 cores, 600,000 train PNGs (benchmarks/results/gpu/gpu.log, issue 10): --provider
# cuda 220,181 images/s, --provider cpu 242,436 (cuda 0.91x; its best variant, chunks of 8192, 252,037 against
# 230,643 for the CPU with the same chunks: 1.09x, within a run's noise), decoding alone 340,752; on 60,000 PNGs
# cuda 50,363 against cpu 133,120 (the inference processes' start-up). CUDA is nowhere measured faster by a margin,
# so auto takes the CPU even where onnxruntime has CUDA, until the GPU figures of the direct hand-off (issue 21:
# cuda >= 1.15x cpu) say otherwise: then CLASSIFY_AUTO_DEVICE becomes True. Static, not a timing probe: a run and
# its --resume always agree on the provider.
CLASSIFY_AUTO_DEVICE = False
CLASSIFY_AUTO_FIGURES = "H100, 16 cores, 600,000 PNGs: cuda 220,181 images/s, cpu 242,436"


def classify_provider(requested: str, have: list[str] | None = None) -> tuple[str, str]:
    """classify's provider for ``requested`` (auto, or a name) and why, in a few words (for --json). ``have``:
    onnxruntime's execution providers (asked for when None). A provider asked for by name that is missing is
    resolve_provider's error."""
    if requested.lower() != "auto":
        return resolve_provider(requested), f"--provider {requested.lower()}"
    if have is None:
        resolve_provider("auto")  # onnxruntime importable, one line if not
        have = available_providers()
    device = next((n for n, ep in PROVIDERS.items() if n != "cpu" and ep in have), None)
    if device is None:
        return "cpu", "auto: onnxruntime here has no GPU provider"
    if CLASSIFY_AUTO_DEVICE:
        return device, f"auto: {PROVIDERS[device]} is available and measured faster ({CLASSIFY_AUTO_FIGURES})"
    return "cpu", (f"auto: {PROVIDERS[device]} is available but classify measured faster on the CPU "
                   f"({CLASSIFY_AUTO_FIGURES})")


def resolve_provider(requested: str) -> str:
    """'auto' -> cuda when onnxruntime has it, else cpu; an explicit provider that is missing is an error."""
    requested = requested.lower()
    if requested not in PROVIDER_CHOICES:
        raise UserError(f"unknown provider {requested!r}; choose {', '.join(PROVIDER_CHOICES)}")
    have = available_providers()
    if requested == "auto":  # the first device provider onnxruntime has, else the CPU
        return next((n for n, ep in PROVIDERS.items() if n != "cpu" and ep in have), "cpu")
    if PROVIDERS[requested] not in have:
        raise UserError(
            f"--provider {requested}: onnxruntime on this machine has no {PROVIDERS[requested]} "
            f"(available: {', '.join(have)}). Install onnxruntime-gpu instead of onnxruntime "
            "(never both) on a machine with CUDA, or use --provider cpu."
        )
    return requested


def _signature_problem(inp, out) -> str | None:
    """Why this model does not take [N, 1, 28, 28] floats and give [N, 10] logits, or None."""
    ishape, oshape = list(inp.shape), list(out.shape)
    if inp.type not in ("tensor(float)", "tensor(float16)"):
        return f"input {inp.name!r} is {inp.type}, expected float32"
    if len(ishape) != 4 or ishape[1:] != [1, IMAGE_SIZE, IMAGE_SIZE]:
        return f"input {inp.name!r} has shape {ishape}, expected [batch, 1, {IMAGE_SIZE}, {IMAGE_SIZE}]"
    if len(oshape) != 2 or oshape[1] != NUM_CLASSES:
        return f"output {out.name!r} has shape {oshape}, expected [batch, {NUM_CLASSES}]"
    return None


def machine_memory() -> int | None:
    """Bytes of memory this process may use at most: the machine's, or its cgroup's limit where lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2; "max": none
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time per second this process's cgroup may use (a container started with --cpus 2: 2.0),
    or None where there is no limit or nothing to read. ``membership`` (/proc/self/cgroup) names the process's
    cgroups; the lowest quota of its own and each one above it counts. cgroup v2: ``cpu.max`` ("max 100000"
    or "200000 100000"); v1: ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (-1: no limit)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    files = []
    for line in lines:  # "ID:CONTROLLERS:PATH"; v2's line has no controllers
        if line.count(":") < 2:
            continue
        _, controllers, own = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            files += [(d / "cpu.max", None) for d in _up(root, own)]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            files += [(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us") for d in _up(root / controllers, own)]
    found = [q for q in (_quota(*f) for f in files) if q is not None]
    return min(found) if found else None


def _up(top: Path, own: str) -> list[Path]:
    """The folder of cgroup ``own`` under the hierarchy mounted at ``top``, and each one above it to ``top``."""
    folder = top / own.strip("/")
    return [folder] + [d for d in folder.parents if top in d.parents or d == top]


def _quota(path: Path, period_path: Path | None) -> float | None:
    """quota / period from a cgroup file (v2: both in ``path``; v1: the period in its own file)."""
    try:
        fields = path.read_text().split()
        if period_path is not None:
            fields += period_path.read_text().split()
        quota, period = fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    if quota == "max" or not quota.isdigit() or period <= 0:  # "max" (v2) or -1 (v1): no limit
        return None
    return int(quota) / period


def usable_cores() -> int:
    """The cores this process may run on: the affinity mask (a container or taskset may allow fewer than the
    machine has), and no more than the cgroup's CPU quota, rounded up (a container limited to 2 CPUs on a
    64-core host gets 2 threads, not 64). Never the load average: thread counts decide how sums are split,
    and training must give the same weights for a seed however busy the machine is."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(n, math.ceil(limit))) if limit else n


def _shape_bytes(value) -> tuple[list, int]:
    """(declared shape, bytes of one tensor of it) for an input or output of the model; a dimension that is
    not a fixed number (the batch axis of a dynamic model) counts as 1: the batch is ours to choose."""
    dims = list(value.shape)
    n = _ITEM_BYTES.get(value.type, 8)
    for d in dims:
        n *= d if isinstance(d, int) and d > 0 else 1
    return dims, n


def _check_memory(path: Path, values) -> None:
    """UserError where one call of the model would need more memory than the machine has, by the shapes it
    declares (a fixed batch of 2^40, a huge output): refused before any work, not killed mid-run."""
    limit = machine_memory()
    if limit is None:
        return
    sizes = [(v.name, *_shape_bytes(v)) for v in values]
    total = sum(n for _, _, n in sizes)
    if total > limit:
        name, dims, n = max(sizes, key=lambda s: s[2])
        raise UserError(f"{path}: {name!r} has the fixed shape {dims}: {n:,} bytes a call, more than this "
                        f"machine's memory ({limit:,} bytes); export the model with a dynamic batch axis")


# onnxruntime's intra-op threads busy-wait for work by default. Beside other busy processes a spinning thread
# holds a core that the thread with the work needs; with waiting threads asleep, verify, export, info and bench
# take their fair share of a busy machine (docs/reliability.md, benchmarks/contention.py). bench's peak figures
# may keep spinning (spin=True); FMNIST_ONNX_ORT_SPIN=1 turns it back on everywhere.
ORT_SPIN_ENV = "FMNIST_ONNX_ORT_SPIN"
SPIN_ENTRY = "session.intra_op.allow_spinning"


def session_options(ort, threads: int | None = None, spin: bool | None = None):
    """onnxruntime.SessionOptions as every session here has them: fatal log lines only, ``threads`` intra-op
    threads (default: the cores this process may use, its cgroup's quota included, where onnxruntime would
    count the machine's), and a pool that sleeps rather than spins unless ``spin`` (default: $FMNIST_ONNX_ORT_SPIN
    is 1)."""
    opts = ort.SessionOptions()
    # fatal only: onnxruntime's warnings and errors (the log lines of a failed run too) become our own one line
    opts.log_severity_level = 4
    opts.intra_op_num_threads = threads or usable_cores()
    if spin is None:
        spin = os.environ.get(ORT_SPIN_ENV, "0") == "1"
    opts.add_session_config_entry(SPIN_ENTRY, "1" if spin else "0")
    return opts


# onnxruntime's own framing of a load error: "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from PATH
# failed:Protobuf parsing failed." The user needs the last part alone.
_ORT_ERROR = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : (?:Load model from .* failed:)?\s*")


def load_error(path: Path, e: Exception) -> str:
    """One line for a model onnxruntime cannot load, without onnxruntime's framing (its error code, the path
    again): a file that is no ONNX protobuf at all (a README, an image) is "not an ONNX model"."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    m = _ORT_ERROR.match(first)
    reason = first[m.end():] if m else first
    reason = reason.strip().rstrip(".") or type(e).__name__
    reason = reason[:1].lower() + reason[1:]
    if m and m.group(1) == "INVALID_PROTOBUF":
        return f"{path}: not an ONNX model ({reason[:200]})"
    return f"{path}: not a loadable ONNX model ({reason[:200]})"


def open_session(
    model: str | Path,
    provider: str = "auto",
    threads: int | None = None,
    spin: bool | None = None,
) -> Session:
    """A checked session for ``model``: UserError for a missing file, a non-ONNX file, the wrong signature,
    or a provider that cannot run it (onnxruntime itself would only warn and run on the CPU). ``threads`` and
    ``spin``: session_options'."""
    ort = import_onnxruntime()

    path = Path(model)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    name = resolve_provider(provider)
    providers = session_providers(name)
    opts = session_options(ort, threads, spin)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise UserError(load_error(path, e)) from None
    used = sess.get_providers()
    if used[0] != PROVIDERS[name]:
        raise UserError(f"{path}: onnxruntime could not run it on {PROVIDERS[name]} (it fell back to {used[0]})")
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"{path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
    problem = _signature_problem(inputs[0], outputs[0])
    if problem:
        raise UserError(f"{path}: not a Fashion-MNIST classifier: {problem}")
    _check_memory(path, [*inputs, *outputs])
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    batch_dim = inputs[0].shape[0]
    fixed = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    if fixed is not None:
        log.info("%s: fixed batch size %d; batches are run at that size", path, fixed)
    return Session(sess, name, inputs[0].name, outputs[0].name, inputs[0].type, meta, fixed)
