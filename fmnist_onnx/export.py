"""Export the quickstart MLP to a self-describing ONNX model, and quantize it to int8.

torch is imported inside the functions that need it: ``quantize_int8`` and ``read_model_info`` run where only
onnx and onnxruntime are installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_onnx import __version__, spec
from fmnist_onnx.errors import UserError

log = logging.getLogger(__name__)

# Pinned rather than the exporter's default (which moves between torch releases), so that the same weights give
# the same file. 18 runs on onnxruntime >= 1.14 and is the lowest opset torch's dynamo exporter implements.
DEFAULT_OPSET = 18
MIN_OPSET = 9  # below 18 the legacy TorchScript exporter is used: the dynamo one silently keeps 18
DYNAMO_MIN_OPSET = 18
EXPORT_BATCH = 2  # a batch of 1 tempts the exporter to specialize the batch axis to a constant


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: a half-written model never has the real name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model, path: Path) -> None:
    """Save an onnx.ModelProto atomically, weights inline (the model is 2.7 MB, far below protobuf's 2 GB)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: onnx.save_model(model, str(p)))


def producer_versions() -> dict[str, str]:
    """Versions of what produced a model: goes into its metadata (no torch import: also used for int8)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"fmnist_onnx": __version__, "python": platform.python_version()}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime"):
        module = sys.modules.get(name)  # the imported module's own version is the precise one (2.14.1+cu130)
        try:
            out[name] = getattr(module, "__version__", None) or version(name)
        except PackageNotFoundError:
            pass
    return out


def _test_accuracy_beside(weights: Path) -> float | None:
    """The test accuracy in metrics.json next to the weights (written by `train`), if there is one."""
    metrics = weights.with_name("metrics.json")
    if not metrics.is_file():
        return None
    try:
        acc = json.loads(metrics.read_text()).get("test_accuracy")
    except (OSError, ValueError, AttributeError):
        log.warning("%s is not readable JSON; no test accuracy in the model's metadata", metrics)
        return None
    return float(acc) if isinstance(acc, (int, float)) else None


def model_metadata(weights: Path) -> dict[str, str]:
    """What makes the model self-describing: classes in label order, preprocessing, provenance."""
    meta = {
        "classes": json.dumps(list(spec.CLASSES)),
        "preprocessing": spec.PREPROCESSING,
        "input": f"{spec.INPUT_NAME}: float32 [batch, 1, {spec.IMAGE_SIZE}, {spec.IMAGE_SIZE}] in [0, 1]",
        "output": f"{spec.OUTPUT_NAME}: float32 [batch, {spec.NUM_CLASSES}] (logits; argmax is the class index)",
        "weights_file": weights.name,
        "weights_sha256": sha256_file(weights),
        "producer": json.dumps(producer_versions()),
    }
    acc = _test_accuracy_beside(weights)
    if acc is not None:
        meta["test_accuracy"] = f"{acc:.2f}"
    return meta


def set_metadata(model, meta: dict[str, str]) -> None:
    """Replace the model's metadata_props with ``meta`` (keys kept in the given order)."""
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def _export_proto(net, opset: int):
    """torch -> onnx.ModelProto with a symbolic batch axis named 'batch'."""
    import io
    import warnings

    import onnx
    import torch

    example = (torch.rand(EXPORT_BATCH, 1, spec.IMAGE_SIZE, spec.IMAGE_SIZE),)
    names = dict(input_names=[spec.INPUT_NAME], output_names=[spec.OUTPUT_NAME])
    if opset >= DYNAMO_MIN_OPSET:
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(net, example, None, **names, dynamic_shapes={"x": {0: batch}},
                                    opset_version=opset, dynamo=True, optimize=True, verbose=False)
        return program.model_proto
    # The dynamo exporter implements opset >= 18 only and, asked for less, keeps 18 when its down-conversion
    # fails (it does for this model). The TorchScript exporter writes these opsets natively.
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, example, buf, **names, opset_version=opset, dynamo=False,
                          dynamic_axes={spec.INPUT_NAME: {0: "batch"}, spec.OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _check_signature(model, opset: int) -> None:
    """The graph must take [batch, 1, 28, 28] float32 and give [batch, 10] with a *symbolic* batch axis."""
    import onnx

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    want_in = ["batch", 1, spec.IMAGE_SIZE, spec.IMAGE_SIZE]
    problems = []
    if inp.name != spec.INPUT_NAME or inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or dims(inp) != want_in:
        problems.append(f"input {inp.name} {dims(inp)}")
    if out.name != spec.OUTPUT_NAME or dims(out) != ["batch", spec.NUM_CLASSES]:
        problems.append(f"output {out.name} {dims(out)}")
    got_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        problems.append(f"opset {got_opset} instead of {opset}")
    if problems:
        # An exporter bug, not a user mistake: say exactly what came out.
        raise RuntimeError(f"exported graph has the wrong signature: {'; '.join(problems)}")


def build_onnx(weights: Path, opset: int | None = None):
    """The exported, checked onnx.ModelProto for ``weights`` (not yet written anywhere)."""
    import onnx

    from fmnist_onnx.model import load_model

    weights = Path(weights)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"--opset {opset}: choose between {MIN_OPSET} and {onnx.defs.onnx_opset_version()}")
    net = load_model(weights)  # UserError for a missing file or a .pth that is not this model's
    model = _export_proto(net, opset)
    _check_signature(model, opset)
    model.producer_name, model.producer_version = "fmnist-onnx", __version__
    model.doc_string = "The PyTorch quickstart MLP trained on Fashion-MNIST (784-512-ReLU-512-ReLU-10)."
    set_metadata(model, model_metadata(weights))
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(weights: Path, output: Path, opset: int | None = None) -> Path:
    """Export ``weights`` (a model.pth) to ``output``, written atomically. No parity check: see verify.py."""
    model = build_onnx(Path(weights), opset)
    output = Path(output)
    save_model(model, output)
    log.info("wrote %s", output)
    return output


# ------------------------------------------------------------------------------------------------ info


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


QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
                 "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def is_quantized(model) -> bool:
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)
