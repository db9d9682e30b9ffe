"""The matrix-product peak of a provider, in the precision of the model that is set against it.

bench reports each model's achieved GFLOP/s as a percentage of this peak: its roofline. A percentage only
means something against a peak of the same arithmetic, so each precision has its own:

- fp32: onnxruntime's MatMul, torch.mm (``with_torch``: bench asks for it where the PyTorch backend runs, so
  that a run without it does not import torch) and (when the thread count is the machine's, since numpy's BLAS
  threads cannot be set here) numpy's ``@``, on float32 matrices;
- int8: onnxruntime's MatMulInteger on uint8 x int8 matrices (int32 sums: the product that onnxruntime's
  QGemm runs for an int8 model, uint8 activations times int8 weights); CPU only, as bench measures int8 on the
  CPU only. Its unit is GOP/s (a multiply-add is 2 operations, as for fp32). torch._int_mm only when asked
  (``torch_int8``): where it has no fast kernel (no VNNI: 3 GOP/s beside onnxruntime's 361 on an AMD EPYC) it
  takes about 10 s a call at 2048 and cannot be the peak.

Each library on square matrices of each size in PEAK_SIZES, the best call of each: on a busy machine only
short calls (512: about 1 ms) find the cores free, and the best call is what counts; 1024 reaches the peak on a
quiet one (the best of 512, 1024 and 2048 was at 512 in benchmarks/results/inference.json). FULL_PEAK_SIZES
adds 2048 (bench --full). There is no fp16 peak: bench gives fp16 rows no percentage.

The matrix-product models are written with the protobuf wire format directly (no onnx package needed), so the
peak is measured where only onnxruntime and numpy are installed; torch is imported only where it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fmnist_onnx.errors import UserError
from fmnist_onnx.machine import usable_cores
from fmnist_onnx.runtime import PROVIDER_TABLE, PROVIDERS, session_providers
from fmnist_onnx.spec import FLOPS_PER_IMAGE
from fmnist_onnx.timing import time_calls

PEAK_SIZES = (512, 1024)
FULL_PEAK_SIZES = (512, 1024, 2048)
PRECISIONS = ("fp32", "int8")
SEED = 0
# onnx.TensorProto element types
_FLOAT, _UINT8, _INT8, _INT32 = 1, 2, 3, 6


@dataclass
class Peak:
    """The matrix-product peak of one provider in one precision, and how it was measured."""

    provider: str
    precision: str  # "fp32" | "int8"
    gflops: float  # GFLOP/s, or for int8 GOP/s
    method: str  # which library gave the best figure
    threads: int | None  # None: the libraries' defaults
    by_method: dict[str, float] = field(default_factory=dict)  # each library's best, over the sizes
    size: int = 0  # the matrix size of the best figure

    @property
    def roofline_images_per_s(self) -> float:
        return self.gflops * 1e9 / FLOPS_PER_IMAGE


# ------------------------------------------------------------------------------------------ a one-node model

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int as a varint (wire type 0), a string or message length-delimited (type 2)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def matmul_model(op: str, n: int, a_type: int, b_type: int, c_type: int) -> bytes:
    """A serialized ONNX model computing C = op(A, B) on [n, n] matrices (opset 13, IR version 8).

    Field numbers from onnx.proto, as info.py reads them: ModelProto ir_version=1 graph=7 opset_import=8;
    OperatorSetIdProto version=2; GraphProto node=1 name=2 input=11 output=12; NodeProto input=1 output=2
    op_type=4; ValueInfoProto name=1 type=2; TypeProto tensor_type=1; Tensor elem_type=1 shape=2;
    TensorShapeProto dim=1; Dimension dim_value=1."""
    def value(name: str, elem: int) -> bytes:
        dim = _field(1, _field(1, n))
        return _field(1, name) + _field(2, _field(1, _field(1, elem) + _field(2, dim + dim)))

    node = _field(1, "A") + _field(1, "B") + _field(2, "C") + _field(4, op)
    graph = (_field(1, node) + _field(2, "matmul") + _field(11, value("A", a_type)) + _field(11, value("B", b_type))
             + _field(12, value("C", c_type)))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 13))


# ------------------------------------------------------------------------------------------ each library

def _best_gflops(run, n: int, duration_s: float) -> float:
    times = time_calls(run, duration_s, warmup_s=0.0)
    return 2 * n**3 / float(times.min()) / 1e9


def _operands(precision: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    if precision == "int8":
        return (rng.integers(0, 256, (n, n), dtype=np.uint8), rng.integers(-128, 128, (n, n), dtype=np.int8))
    return rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)


def _ort_gflops(provider: str, precision: str, threads: int | None, duration_s: float, n: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # The provider's options as runtime.open_session sets them (no TF32 on CUDA): an fp32 model's roofline is an
    # fp32 peak.
    providers = session_providers(provider)
    device = PROVIDER_TABLE[provider].device
    model = (matmul_model("MatMulInteger", n, _UINT8, _INT8, _INT32) if precision == "int8"
             else matmul_model("MatMul", n, _FLOAT, _FLOAT, _FLOAT))
    sess = ort.InferenceSession(model, opts, providers=providers)
    if sess.get_providers()[0] != PROVIDERS[provider]:  # onnxruntime falls back to the CPU with a mere warning
        raise UserError(f"onnxruntime could not run a MatMul on {PROVIDERS[provider]} (it fell back to the CPU)")
    a, b = _operands(precision, n)
    if PROVIDER_TABLE[provider].io_binding:  # inputs and output on the device, else the copies are what gets timed
        binding = sess.io_binding()
        for name, x in (("A", a), ("B", b)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        binding.bind_ortvalue_output("C", ort.OrtValue.ortvalue_from_shape_and_type([n, n], np.float32, device, 0))
        return _best_gflops(lambda: sess.run_with_iobinding(binding), n, duration_s)
    return _best_gflops(lambda: sess.run(None, {"A": a, "B": b}), n, duration_s)


def _torch_gflops(provider: str, precision: str, threads: int | None, duration_s: float, n: int) -> float | None:
    """torch's product, or None where torch is not installed or cannot run it here."""
    try:
        import torch
    except ImportError:
        return None
    if provider == "cuda" and not torch.cuda.is_available():
        return None
    if threads:
        torch.set_num_threads(threads)
    if precision == "int8":
        # torch has no uint8 x int8 product: int8 x int8 (the same VNNI dot products), where _int_mm runs.
        rng = np.random.default_rng(SEED)
        a, b = (torch.from_numpy(rng.integers(-128, 128, (n, n), dtype=np.int8)).to(provider) for _ in range(2))
        product = getattr(torch, "_int_mm", None)
    else:
        g = torch.Generator().manual_seed(SEED)
        a, b = (torch.rand(n, n, generator=g).to(provider) for _ in range(2))
        product = torch.mm
    try:
        product(a, b)
    except (TypeError, RuntimeError, NotImplementedError):  # _int_mm is missing or not built for this device
        return None

    def run():
        product(a, b)
        if provider == "cuda":
            torch.cuda.synchronize()

    return _best_gflops(run, n, duration_s)


def _numpy_gflops(duration_s: float, n: int) -> float:
    a, b = _operands("fp32", n)
    return _best_gflops(lambda: a @ b, n, duration_s)


def matmul_peak(provider: str = "cpu", precision: str = "fp32", threads: int | None = None,
                duration_s: float = 1.0, sizes: Sequence[int] = PEAK_SIZES, torch_int8: bool = False,
                with_torch: bool = True) -> Peak:
    """The matrix-product peak with ``threads``, in GFLOP/s (int8: GOP/s): the best of the libraries at hand
    (see the module docstring), each on square matrices of each size in ``sizes``, best call of each; the int8
    peak with torch._int_mm only where ``torch_int8``, the fp32 one with torch.mm only ``with_torch``."""
    if precision not in PRECISIONS or (precision == "int8" and provider != "cpu"):
        raise ValueError(f"no {precision} matrix-product peak on {provider}")
    # numpy's BLAS uses every core it sees, and cannot be told otherwise without threadpoolctl.
    with_numpy = precision == "fp32" and provider == "cpu" and (threads is None or threads == usable_cores())
    with_torch = torch_int8 if precision == "int8" else with_torch
    per = max(0.05, duration_s / (len(sizes) * (1 + with_numpy + with_torch)))
    found: dict[str, float] = {}
    best_size: dict[str, int] = {}
    for n in sizes:
        got = {"onnxruntime": _ort_gflops(provider, precision, threads, per, n)}
        if with_torch:
            got["torch"] = _torch_gflops(provider, precision, threads, per, n)
        if with_numpy:
            got["numpy"] = _numpy_gflops(per, n)
        for name, gflops in got.items():
            if gflops is not None and gflops > found.get(name, 0.0):
                found[name], best_size[name] = gflops, n
    method = max(found, key=found.get)
    return Peak(provider, precision, found[method], method, threads, found, best_size[method])
