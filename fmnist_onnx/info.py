"""What `fmnist-onnx info` shows, read with onnxruntime alone (no torch, no onnx package).

onnxruntime gives the signature and the metadata; the few facts it does not expose (opset, IR version,
producer, initializer sizes, operator types) are read from the file's protobuf wire format directly. That is
a read-only walk over four message types, so the inference-only install needs nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_onnx.errors import UserError

QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
                 "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
_INT64 = 7  # onnx.TensorProto.INT64: shape constants, not parameters


@dataclass
class TensorInfo:
    name: str
    type: str
    shape: list  # ints and symbolic names


@dataclass
class ModelInfo:
    path: str
    file_size_bytes: int
    opset: int | None
    ir_version: int
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    parameters: int
    quantized: bool
    metadata: dict[str, str] = field(default_factory=dict)
    available_providers: list[str] = field(default_factory=list)


def is_int8(model: str | Path) -> bool:
    """Whether the ONNX file ``model`` is quantized (has quantization operators): the one answer that info,
    export, verify and bench use. Reads the file's protobuf directly, so it needs neither onnx nor torch."""
    return _quantized(_summarize(Path(model).read_bytes()).op_types)


def _quantized(op_types: Iterable[str]) -> bool:
    return any(op in QUANTIZED_OPS for op in op_types)


# --- protobuf wire format: (field number, wire type, value), value an int (varint) or bytes (length-delimited)

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, value


def _ints(wire: int, value) -> list[int]:
    """A repeated int64 field, packed (one length-delimited run) or not."""
    if wire == 0:
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


@dataclass
class _Summary:
    ir_version: int = 0
    producer: str = ""
    opsets: dict[str, int] = field(default_factory=dict)
    op_types: set[str] = field(default_factory=set)
    parameters: int = 0


# Inputs of quantized operators that hold scales and zero points (per channel they are vectors, not scalars).
_QUANT_PARAM_INPUTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "MatMulInteger": (2, 3)}


def _summarize(buf: bytes) -> _Summary:
    # Field numbers from onnx.proto: ModelProto ir_version=1 producer_name=2 producer_version=3 graph=7
    # opset_import=8; OperatorSetIdProto domain=1 version=2; GraphProto node=1 initializer=5;
    # NodeProto input=1 op_type=4; TensorProto dims=1 data_type=2 name=8.
    s, producer = _Summary(), ["", ""]
    sizes: dict[str, int] = {}  # initializer -> element count, for weights and biases
    quant_params: set[str] = set()
    for num, wire, value in _fields(buf):
        if num == 1 and wire == 0:
            s.ir_version = value
        elif num in (2, 3) and wire == 2:
            producer[num - 2] = value.decode(errors="replace")
        elif num == 8 and wire == 2:
            opset = dict((n, v) for n, _, v in _fields(value))
            domain = opset.get(1, b"").decode(errors="replace")
            s.opsets[domain or "ai.onnx"] = opset.get(2, 0)
        elif num == 7 and wire == 2:
            for gnum, gwire, gvalue in _fields(value):
                if gnum == 1 and gwire == 2:
                    node = list(_fields(gvalue))
                    op = next((v.decode(errors="replace") for n, _, v in node if n == 4), "")
                    inputs = [v.decode(errors="replace") for n, _, v in node if n == 1]
                    s.op_types.add(op)
                    quant_params.update(inputs[i] for i in _QUANT_PARAM_INPUTS.get(op, ()) if i < len(inputs))
                elif gnum == 5 and gwire == 2:
                    dims, dtype, name = [], 0, ""
                    for tnum, twire, tvalue in _fields(gvalue):
                        if tnum == 1:
                            dims += _ints(twire, tvalue)
                        elif tnum == 2:
                            dtype = tvalue
                        elif tnum == 8:
                            name = tvalue.decode(errors="replace")
                    size = 1
                    for d in dims:
                        size *= d
                    # Weights and biases: per-tensor scales and zero points are scalars, shapes are int64.
                    if size > 1 and dtype != _INT64:
                        sizes[name] = size
    s.parameters = sum(size for name, size in sizes.items() if name not in quant_params)
    s.producer = " ".join(p for p in producer if p)
    return s


def read_model_info(path: str | Path) -> ModelInfo:
    """UserError for a missing file, a file that is not ONNX, or a model with another signature."""
    from fmnist_onnx.runtime import available_providers, open_session

    path = Path(path)
    sess = open_session(path, "cpu")  # UserError for a missing, unreadable or foreign model
    try:
        summary = _summarize(path.read_bytes())
    except (ValueError, IndexError) as e:  # onnxruntime loaded it, so this would be a bug in the reader
        raise UserError(f"{path}: cannot read the model's protobuf ({e})") from None

    def tensor(v) -> TensorInfo:
        return TensorInfo(v.name, ORT_TYPES.get(v.type, v.type), list(v.shape))

    return ModelInfo(str(path), path.stat().st_size, summary.opsets.get("ai.onnx"), summary.ir_version,
                     summary.producer, [tensor(v) for v in sess.session.get_inputs()],
                     [tensor(v) for v in sess.session.get_outputs()], summary.parameters,
                     _quantized(summary.op_types), sess.metadata, available_providers())
