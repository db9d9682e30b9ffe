"""Export the quickstart MLP to a self-describing ONNX model, and quantize it to int8.

torch is imported inside the functions that need it: ``quantize_int8`` runs where only
onnx and onnxruntime are installed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fmnist_onnx import __version__, spec
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import atomic_write, check_distinct, check_output, publish, sha256_file, temp_beside
from fmnist_onnx.info import is_int8
from fmnist_onnx.machine import library_versions

log = logging.getLogger(__name__)

# Pinned rather than the exporter's default (which moves between torch releases), so that the same weights give
# the same file. 18 runs on onnxruntime >= 1.14 and is the lowest opset torch's dynamo exporter implements.
DEFAULT_OPSET = 18
MIN_OPSET = 9  # below 18 the legacy TorchScript exporter is used: the dynamo one silently keeps 18
DYNAMO_MIN_OPSET = 18
EXPORT_BATCH = 2  # a batch of 1 tempts the exporter to specialize the batch axis to a constant


def save_model(model, path: Path, overwrite: bool = False) -> None:
    """Save an onnx.ModelProto atomically, weights inline (the model is 2.7 MB, far below protobuf's 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(model.SerializeToString()), overwrite)


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
        "input": f"{spec.INPUT_NAME}: float32 [{', '.join(map(str, spec.INPUT_SHAPE))}] in [0, 1]",
        "output": f"{spec.OUTPUT_NAME}: float32 [{', '.join(map(str, spec.OUTPUT_SHAPE))}] (logits; argmax is the "
                  "class index)",
        "weights_file": weights.name,
        "weights_sha256": sha256_file(weights),
        "producer": json.dumps(library_versions()),
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


def model_opset(model) -> int | None:
    """The default-domain opset an onnx.ModelProto imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_signature(model, opset: int) -> None:
    """The graph must take [batch, 1, 28, 28] float32 and give [batch, 10] with a *symbolic* batch axis."""
    import onnx

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    problems = []
    float32 = onnx.TensorProto.FLOAT
    if inp.name != spec.INPUT_NAME or inp.type.tensor_type.elem_type != float32 or dims(inp) != [*spec.INPUT_SHAPE]:
        problems.append(f"input {inp.name} {dims(inp)}")
    if out.name != spec.OUTPUT_NAME or dims(out) != [*spec.OUTPUT_SHAPE]:
        problems.append(f"output {out.name} {dims(out)}")
    got_opset = model_opset(model)
    if got_opset != opset:
        problems.append(f"opset {got_opset} instead of {opset}")
    if problems:
        # An exporter bug, not a user mistake: say exactly what came out.
        raise RuntimeError(f"exported graph has the wrong signature: {'; '.join(problems)}")


def build_onnx(weights: Path, opset: int | None = None):
    """The exported, checked onnx.ModelProto for ``weights`` (not yet written anywhere)."""
    import onnx

    from fmnist_onnx.model import load_model, use_usable_cores

    use_usable_cores()
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


# ------------------------------------------------------------------------------------------------ int8

INT8_METHODS = ("static", "dynamic")
# Chosen by measurement (docs/export.md, "int8"): the same accuracy as dynamic, faster at the batch sizes classify uses.
DEFAULT_INT8_METHOD = "static"
CALIBRATION_IMAGES = 2000
CALIBRATION_SEED = 0
INT8_DESCRIPTIONS = {
    "static": "int8 static QDQ (onnxruntime.quantization.quantize_static): uint8 activations, int8 weights "
              "{weights}, MinMax-calibrated on {n} training images{logits}",
    "dynamic": "int8 dynamic (onnxruntime.quantization.quantize_dynamic): int8 weights, activations quantized "
               "per batch at run time (MatMulInteger)",
}
MATRIX_PRODUCTS = ("Gemm", "MatMul")


def calibration_images(n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED, data_dir=None):
    """``n`` training images (never test images: those judge the result), drawn with a fixed seed."""
    import numpy as np

    from fmnist_onnx.data import load_split

    split = load_split(True, data_dir)
    idx = np.random.default_rng(seed).choice(len(split.labels), size=min(n, len(split.labels)), replace=False)
    return split.as_float().numpy()[np.sort(idx)]


def logits_layer(model) -> list[str]:
    """Names of the nodes from the last matrix product (Gemm or MatMul) to the graph's output, walking back
    from the output; empty when no matrix product feeds it."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names, tensor = [], model.graph.output[0].name
    while tensor in producer:
        node = producer[tensor]
        names.append(node.name)
        if node.op_type in MATRIX_PRODUCTS:
            return names
        tensor = next((t for t in node.input if t in producer), "")
    return []


def quantize_int8(model_path: Path, out_path: Path, method: str = DEFAULT_INT8_METHOD, calibration=None,
                  data_dir=None, per_channel: bool = True, float_logits: bool = True,
                  overwrite: bool = False) -> Path:
    """Write an int8 copy of the fp32 model ``model_path`` to ``out_path`` (atomically); no accuracy check here.

    ``calibration``: float32 images [N, 1, 28, 28] for the static method (default: 2,000 training images).
    Static only: ``per_channel`` gives each output channel of a weight matrix its own scale; ``float_logits``
    keeps the last layer in float. Quantized to uint8, the logits could only take 256 values over a calibrated
    range (about -4 to 6), so scores were coarse, logits beyond the range clipped, and on the test set dozens of
    images had an exact tie for the top class (benchmarks/int8_methods.py measures both, and the speed cost:
    the last layer is 0.8% of the work). Dynamic quantization gives float logits anyway.
    The metadata is the fp32 model's, less its test accuracy (int8's differs), plus ``quantization``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in INT8_METHODS:
        raise UserError(f"unknown int8 method {method!r}; choose {' or '.join(INT8_METHODS)}")
    model_path, out_path = Path(model_path), Path(out_path)
    fp32 = _fp32_model(model_path)
    meta = {p.key: p.value for p in fp32.metadata_props if p.key != "test_accuracy"}
    with tempfile.TemporaryDirectory(prefix="fmnist-onnx-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        # onnxruntime's recommended preparation (shape inference, graph clean-up); it warns without it.
        quant_pre_process(str(model_path), str(src))
        if method == "dynamic":
            # quantize_dynamic rewrites each Gemm (nn.Linear) as MatMul + Add, then quantizes the MatMul.
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
            meta["quantization"] = INT8_DESCRIPTIONS["dynamic"]
        else:
            images = calibration_images(data_dir=data_dir) if calibration is None else calibration
            meta["quantization"] = _quantize_static(src, dst, images, fp32.graph.input[0].name, per_channel,
                                                    float_logits)
        int8 = onnx.load(str(dst))
    meta["producer"] = json.dumps(library_versions())
    set_metadata(int8, meta)
    int8.doc_string = fp32.doc_string
    int8.producer_name, int8.producer_version = fp32.producer_name, fp32.producer_version
    onnx.checker.check_model(int8, full_check=True)
    save_model(int8, out_path, overwrite)
    return out_path


def _fp32_model(model_path: Path):
    """The fp32 ONNX model to quantize, loaded; one line where it is missing, not ONNX, or int8 already."""
    import onnx

    if not model_path.is_file():
        raise UserError(f"model file not found: {model_path}")
    try:
        fp32 = onnx.load(str(model_path))
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, onnx its own types
        raise UserError(f"{model_path}: not an ONNX model ({type(e).__name__})") from None
    if is_int8(model_path):
        raise UserError(f"{model_path}: already quantized; quantize the fp32 model")
    return fp32


def _quantize_static(src: Path, dst: Path, images, input_name: str, per_channel: bool, float_logits: bool) -> str:
    """QDQ quantization of ``src`` into ``dst``, calibrated on ``images`` in batches of 500 (quantize_int8 says
    why the logits stay in float); the description for the int8 model's metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(images), 500))

        def get_next(self):
            i = next(self.batches, None)
            return None if i is None else {input_name: images[i:i + 500]}

    in_float = logits_layer(onnx.load(str(src))) if float_logits else []
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel, nodes_to_exclude=in_float)
    return INT8_DESCRIPTIONS["static"].format(
        n=len(images), weights="per output channel" if per_channel else "per tensor",
        logits="; the last layer in float (logits not quantized)" if in_float else "; logits quantized")


def int8_path(output: Path) -> Path:
    """model.onnx -> model.int8.onnx, beside it."""
    output = Path(output)
    stem = output.name[:-len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{stem}.int8.onnx")


# ------------------------------------------------------------------------------- export, verified


@dataclass
class Int8Result:
    path: str
    written: bool  # False: refused (it lost too much accuracy or disagreed too often with PyTorch)
    method: str
    description: str
    fp32_accuracy_pct: float  # PyTorch's, on the same test images
    int8_accuracy_pct: float
    accuracy_change_points: float
    top1_agreement_pct: float
    top1_ties: int  # test images whose top logit is shared by two classes exactly
    failures: list[str]


@dataclass
class ExportResult:
    output: str
    written: bool  # False: parity did not hold, and nothing was written
    opset: int
    weights_sha256: str
    seconds: float
    verify: object | None = None  # verify.VerifyReport, None with --no-verify
    int8: Int8Result | None = None

    @property
    def passed(self) -> bool:
        return self.written and (self.int8 is None or self.int8.written)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"output": self.output, "written": self.written, "passed": self.passed, "opset": self.opset,
                "weights_sha256": self.weights_sha256, "seconds": self.seconds,
                "verify": self.verify.to_dict() if self.verify is not None else None,
                "int8": asdict(self.int8) if self.int8 is not None else None}


def check_outputs(weights: Path, output: Path, quantize: str | None, overwrite: bool,
                  also: tuple[Path | None, ...] = ()) -> None:
    """The write policy for export's files, before any work: the ONNX file, its int8 twin and ``also`` (the
    --json) are new unless ``overwrite``, none of them is the weights, and no two are the same file."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name such as {output / 'model.onnx'}")
    if output.parent.exists() and not output.parent.is_dir():
        raise UserError(f"--output {output}: {output.parent} is not a folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    outputs = [output, *([int8_path(output)] if quantize else []), *(p for p in also if p is not None)]
    check_distinct(outputs)
    for p in outputs:
        check_output(p, overwrite, inputs=[weights])


def export(weights: Path, output: Path, opset: int | None = None, verify: bool = True, quantize: str | None = None,
           int8_method: str = DEFAULT_INT8_METHOD, atol: float | None = None, rtol: float | None = None,
           providers: tuple[str, ...] = ("auto",), data_dir=None, overwrite: bool = False,
           on_stage: Callable[[str], None] | None = None) -> ExportResult:
    """Export, check parity (unless ``verify`` is False) and optionally write an int8 copy beside the output.

    A model that fails the parity check is never written under ``output`` (an older file there is left as it
    was); neither is an int8 model that fails its accuracy check. An existing output is replaced only with
    ``overwrite`` (the caller holds the lock: ``files.locked``). UserError for bad input. ``on_stage(what)`` is
    told each stage as it starts (the CLI's progress lines).
    """
    import time

    t0 = time.perf_counter()
    weights, output = Path(weights), Path(output)
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize}: only int8 is supported")
    if not weights.is_file():
        raise UserError(f"weights file not found: {weights} (train one with `fmnist-onnx train`, or pass --weights)")
    check_outputs(weights, output, quantize, overwrite)
    say = on_stage or (lambda what: None)
    model = build_onnx(weights, opset)
    sha = next(p.value for p in model.metadata_props if p.key == "weights_sha256")
    result = ExportResult(str(output), False, model_opset(model), sha, 0.0)
    if verify:
        say(f"exported (opset {result.opset}); checking it against PyTorch ...")
    if not _write_verified(model, weights, output, result, verify, atol, rtol, providers, data_dir, overwrite, say):
        result.seconds = time.perf_counter() - t0
        return result
    if quantize == "int8":
        say(f"quantizing to int8 ({int8_method}) and measuring it ...")
        result.int8 = write_int8(output, weights, int8_method, providers, data_dir, overwrite, say)
    result.seconds = time.perf_counter() - t0
    return result


def _write_verified(model, weights: Path, output: Path, result: ExportResult, verify: bool, atol, rtol,
                    providers, data_dir, overwrite: bool, say: Callable[[str], None] | None = None) -> bool:
    """Write ``model`` to a temporary file, check it there as `fmnist-onnx verify` does, then give it its name:
    a model that fails parity never gets it. Whether it was written."""
    from fmnist_onnx import verify as vf

    atol = vf.DEFAULT_ATOL if atol is None else atol
    rtol = vf.DEFAULT_RTOL if rtol is None else rtol
    try:
        with temp_beside(output) as (tmp, f):
            f.write(model.SerializeToString())
            f.flush()
            if verify:
                result.verify = vf.verify(tmp, weights, providers, atol, rtol, data_dir=data_dir, on_stage=say)
                result.verify.model = str(output)
                if not result.verify.passed:
                    return False
            publish(tmp, f, output, overwrite)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    result.written = True
    log.info("wrote %s", output)
    return True


def write_int8(fp32_path: Path, weights: Path, method: str = DEFAULT_INT8_METHOD, providers=("auto",),
               data_dir=None, overwrite: bool = False, say: Callable[[str], None] | None = None) -> Int8Result:
    """Quantize, measure against PyTorch on the test set, and give it its name only if it keeps accuracy."""
    import onnx

    from fmnist_onnx import verify as vf

    final = int8_path(fp32_path)
    with tempfile.TemporaryDirectory(prefix="fmnist-onnx-int8-") as private:  # ours alone (mode 0700)
        tmp = Path(private) / "int8.onnx"
        quantize_int8(fp32_path, tmp, method, data_dir=data_dir)
        report = vf.verify(tmp, weights, providers, data_dir=data_dir, on_stage=say)
        worst = min(report.results, key=lambda r: r.onnx_accuracy_pct)
        failures = [f for r in report.results for f in r.failures]
        model = onnx.load(str(tmp))
        meta = {p.key: p.value for p in model.metadata_props}
        res = Int8Result(str(final), False, method, meta.get("quantization", method), worst.torch_accuracy_pct,
                         worst.onnx_accuracy_pct, worst.accuracy_change_points, worst.top1_agreement_pct,
                         worst.top1_ties, failures)
        if failures:
            return res
        meta["test_accuracy"] = f"{worst.onnx_accuracy_pct:.2f}"
        meta["fp32_test_accuracy"] = f"{worst.torch_accuracy_pct:.2f}"
        set_metadata(model, meta)
        save_model(model, final, overwrite)
        res.written = True
        return res
