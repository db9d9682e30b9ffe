"""Prove an ONNX model computes what the PyTorch weights compute, on the real test images.

fp32: an element of the logits fails only where |a - b| > atol and |a - b| > rtol * |b| (Polygraphy's rule;
a = onnxruntime, b = PyTorch), and top-1 must agree on every image. int8: logits are expected to move, so the
check is top-1 agreement with PyTorch and the change in test accuracy. Nothing passes "with a warning".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fmnist_onnx.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
# int8: the accuracy may drop this many points at most, and top-1 must agree with PyTorch on this share of
# images. Int8 of a trained model agrees on about 99.9% (docs/export.md, the int8 table); another model's weights
# agree on about 90%.
MAX_INT8_ACCURACY_DROP = 0.5
MIN_INT8_AGREEMENT_PCT = 98.0
BATCH = 1000


@dataclass
class ProviderResult:
    provider: str  # cpu | cuda
    passed: bool
    failures: list[str]  # why it did not pass, one phrase each
    samples: int
    top1_agreement_pct: float
    top1_ties: int  # images whose top logit is shared by two classes exactly (see top1_ties)
    torch_accuracy_pct: float
    onnx_accuracy_pct: float
    accuracy_change_points: float  # onnx minus torch
    # logits (reported in both modes; they decide only in fp32 mode)
    failing_elements: int
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float
    mean_rel_diff: float
    min_passing_atol: float  # the smallest atol that would have passed with this rtol
    seconds: float


@dataclass
class VerifyReport:
    model: str
    weights: str
    mode: str  # fp32 | int8
    atol: float
    rtol: float
    max_accuracy_drop_points: float
    min_top1_agreement_pct: float
    samples: int
    weights_sha256: str
    model_weights_sha256: str | None  # from the model's metadata
    results: list[ProviderResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def weights_match_metadata(self) -> bool | None:
        """Whether the model says it was exported from these very bytes (a note: the numbers decide)."""
        return None if self.model_weights_sha256 is None else self.model_weights_sha256 == self.weights_sha256

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        d["weights_match_metadata"] = self.weights_match_metadata
        return d


@dataclass
class EvalSet:
    images: object  # numpy float32 [N, 1, 28, 28] in [0, 1]
    labels: object  # numpy int64 [N]


def load_test_set(samples: int | None = None, data_dir: str | Path | None = None) -> EvalSet:
    """The first ``samples`` Fashion-MNIST test images (all 10,000 by default), preprocessed as the model wants."""
    from fmnist_onnx.data import load_split

    split = load_split(False, data_dir)
    n = len(split.labels) if samples is None else int(samples)
    if not 1 <= n <= len(split.labels):
        raise UserError(f"--samples {n}: choose between 1 and {len(split.labels)}")
    return EvalSet(split.as_float()[:n].numpy(), split.labels[:n].numpy())


def torch_logits(weights, images) -> object:
    """PyTorch's fp32 logits on the CPU for numpy images: the reference. ``weights``: a path or a loaded model."""
    import numpy as np
    import torch

    from fmnist_onnx.model import load_model, use_usable_cores

    use_usable_cores()
    model = load_model(weights) if isinstance(weights, (str, Path)) else weights
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), BATCH):
            out.append(model(torch.from_numpy(images[i:i + BATCH])).numpy())
    return np.concatenate(out)


def session_logits(session, images, batch_size: int = BATCH):
    """onnxruntime logits for numpy images, in batches (a runtime.Session)."""
    import numpy as np

    return np.concatenate([session.run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def top1_ties(logits) -> int:
    """Rows whose highest logit is shared by two classes exactly: argmax then picks the first one, whatever the
    model meant (quantized logits take few distinct values, so this is where int8 used to lose agreement)."""
    import numpy as np

    top2 = np.sort(logits, axis=1)[:, -2:]
    return int((top2[:, 0] == top2[:, 1]).sum())


def compare_logits(actual, expected, atol: float, rtol: float) -> dict[str, float]:
    """Polygraphy's comparison of ``actual`` (onnxruntime) against ``expected`` (PyTorch)."""
    import numpy as np

    a, b = actual.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.abs(b), np.finfo(np.float32).tiny)
    failing = (diff > atol) & (diff > rtol * np.abs(b))
    # Elements that the relative rule does not cover need atol >= |a - b|; the largest of them is the answer.
    uncovered = diff[diff > rtol * np.abs(b)]
    return {
        "failing_elements": int(failing.sum()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float(rel.max()),
        "mean_rel_diff": float(rel.mean()),
        "min_passing_atol": float(uncovered.max()) if uncovered.size else 0.0,
    }


def verify(model: str | Path, weights: str | Path, providers: tuple[str, ...] | list[str] = ("auto",),
           atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, samples: int | None = None,
           data_dir: str | Path | None = None, max_accuracy_drop: float = MAX_INT8_ACCURACY_DROP,
           min_agreement_pct: float = MIN_INT8_AGREEMENT_PCT,
           on_stage: Callable[[str], None] | None = None) -> VerifyReport:
    """Compare ``model`` with ``weights`` on the test set, on each provider. UserError for bad input.
    ``on_stage(what)`` is told each stage as it starts (the CLI's progress lines)."""
    from fmnist_onnx.files import sha256_file
    from fmnist_onnx.info import is_int8
    from fmnist_onnx.model import load_model
    from fmnist_onnx.runtime import open_session, resolve_provider

    if atol < 0 or rtol < 0:
        raise UserError("--atol and --rtol must be >= 0")
    model, weights = Path(model), Path(weights)
    # Open every session first: a bad model or a missing provider is reported before any work is done.
    names = list(dict.fromkeys(resolve_provider(p) for p in providers or ("auto",)))
    sessions = [open_session(model, p) for p in names]
    say = on_stage or (lambda what: None)
    net = load_model(weights)  # UserError for a missing .pth or one that is not this model's
    say("reading the test images, PyTorch's logits ...")
    test = load_test_set(samples, data_dir)
    reference = torch_logits(net, test.images)
    mode = "int8" if is_int8(model) else "fp32"
    report = VerifyReport(str(model), str(weights), mode, atol, rtol, max_accuracy_drop, min_agreement_pct,
                          len(test.labels), sha256_file(weights), sessions[0].metadata.get("weights_sha256"))
    ref_pred = reference.argmax(1)
    torch_acc = 100.0 * float((ref_pred == test.labels).mean())
    for sess in sessions:
        say(f"onnxruntime on {sess.provider}, {len(test.labels):,} images ...")
        t0 = time.perf_counter()
        logits = session_logits(sess, test.images)
        stats = compare_logits(logits, reference, atol, rtol)
        pred = logits.argmax(1)
        agreement = 100.0 * float((pred == ref_pred).mean())
        acc = 100.0 * float((pred == test.labels).mean())
        failures = []
        if mode == "fp32":
            if stats["failing_elements"]:
                failures.append(f"{stats['failing_elements']} logits differ by more than atol {atol:g} and "
                                f"rtol {rtol:g} (max |a-b| {stats['max_abs_diff']:.3g}; atol "
                                f"{stats['min_passing_atol']:.3g} would pass)")
            if agreement < 100.0:
                failures.append(f"top-1 differs on {int((pred != ref_pred).sum())} of {len(pred)} images")
        else:
            if agreement < min_agreement_pct:
                failures.append(f"top-1 agreement {agreement:.2f}% < {min_agreement_pct:g}%")
            if acc - torch_acc < -max_accuracy_drop:
                failures.append(f"accuracy drops {torch_acc - acc:.2f} points > {max_accuracy_drop:g}")
        report.results.append(ProviderResult(
            sess.provider, not failures, failures, len(pred), agreement, top1_ties(logits), torch_acc, acc,
            acc - torch_acc,
            seconds=time.perf_counter() - t0, **stats))
        log.info("verify %s on %s: %s", model, sess.provider, "pass" if not failures else "; ".join(failures))
    return report


def checks(report: VerifyReport) -> str:
    """What PASS and FAIL were decided by, in the words of the PASS line: a max rel of 0.1 beside PASS is no
    contradiction once the line says that an element fails only beyond atol too."""
    if report.mode == "fp32":
        return (f"checked: every logit within atol {report.atol:g} or within rtol {report.rtol:g} x |PyTorch's| "
                "of PyTorch's, and the same top-1 class on every image")
    return (f"int8, checked: top-1 the same as PyTorch's on >= {report.min_top1_agreement_pct:g}% of images, "
            f"accuracy at most {report.max_accuracy_drop_points:g} points below PyTorch's; logits not compared")


def format_report(report: VerifyReport) -> str:
    """The human-readable report the CLI prints."""
    lines = [f"verify {report.model} against {report.weights} ({report.mode}, {report.samples} test images)"]
    if report.weights_match_metadata is False:
        lines.append("  note: the model's metadata names other weights (sha256 differs); the numbers decide")
    for r in report.results:
        lines.append(f"  {r.provider}: {'PASS' if r.passed else 'FAIL'} ({checks(report)})")
        if report.mode == "fp32":
            lines.append(f"    logits: max |a-b| {r.max_abs_diff:.3g}, mean {r.mean_abs_diff:.3g}; max rel "
                         f"{r.max_rel_diff:.3g}, mean {r.mean_rel_diff:.3g} (large where a logit is near 0: "
                         f"atol covers those); failing {r.failing_elements}; smallest passing atol "
                         f"{r.min_passing_atol:.3g}")
        else:
            lines.append(f"    logits (informative for int8): max |a-b| {r.max_abs_diff:.3g}, "
                         f"mean {r.mean_abs_diff:.3g}")
        ties = f" ({r.top1_ties} images with a tie for the top logit)" if r.top1_ties else ""
        lines.append(f"    top-1 agreement {r.top1_agreement_pct:.2f}%{ties}; accuracy PyTorch "
                     f"{r.torch_accuracy_pct:.2f}%, ONNX {r.onnx_accuracy_pct:.2f}% ({r.accuracy_change_points:+.2f} "
                     "points)")
        for why in r.failures:
            lines.append(f"    fails: {why}")
    return "\n".join(lines)
