"""PNG charts for what people would rather look at than read. matplotlib is imported lazily."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fmnist_onnx.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, overwrite: bool) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), overwrite)


def smoothed_loss_floor(label_smoothing: float, classes: int) -> float:
    """The lowest label-smoothed cross-entropy any model can reach: the entropy of the smoothed target
    (1 - eps + eps/K on the true class, eps/K on each other one). 0.50 for eps 0.1 and 10 classes."""
    if not label_smoothing:
        return 0.0
    hit, miss = 1 - label_smoothing + label_smoothing / classes, label_smoothing / classes
    return -(hit * math.log(hit) + (classes - 1) * miss * math.log(miss))


def training_curves(history: Sequence, path: str | Path, title: str = "", label_smoothing: float = 0.0,
                    classes: int = 10, overwrite: bool = False) -> Path:
    """Train/test loss and test accuracy per epoch (records with epoch, train_loss, test_loss, test_accuracy).

    The training loss is the one training minimized, averaged over the epoch's batches: with label smoothing
    it is not the test's plain cross-entropy and cannot fall below ``smoothed_loss_floor`` (about 0.5), so it
    sits above the test loss for the whole run. The legend says which loss each line is, and the floor is
    drawn, so that the gap is not read as the model doing worse on the data it trains on."""
    plt = _pyplot()
    epochs = [h.epoch for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    smoothed = f"label-smoothed ({label_smoothing:g}) " if label_smoothing else ""
    ax1.plot(epochs, [h.train_loss for h in history], "o-", label=f"train: {smoothed}cross-entropy, epoch mean")
    ax1.plot(epochs, [h.test_loss for h in history], "o-", label="test: plain cross-entropy, end of epoch")
    if label_smoothing:
        floor = smoothed_loss_floor(label_smoothing, classes)
        ax1.axhline(floor, color="C0", ls=":", lw=1,
                    label=f"lowest label-smoothed cross-entropy possible ({floor:.2f})")
        ax1.set_title("two different losses: compare their shapes, not their levels", fontsize=9)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [h.test_accuracy for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, Path(path), overwrite)
    plt.close(fig)
    return Path(path)


def bench_chart(report: dict, path: str | Path, title: str = "", overwrite: bool = False) -> Path:
    """Images/s and median latency against batch size, one line per option, with the rooflines (fp32, int8).

    ``report`` is the JSON form of a benchmark (``BenchReport.to_json()`` or benchmarks/results/inference.json).
    """
    plt = _pyplot()
    series: dict[str, list[dict]] = {}
    for r in report["results"]:
        label = f"{r['backend']} {r['provider']} {r['precision']}" + (" iobinding" if r.get("io_binding") else "")
        series.setdefault(label, []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        sizes = [r["batch_size"] for r in rows]
        ax1.plot(sizes, [r["images_per_s"] for r in rows], "o-", label=label)
        ax2.plot(sizes, [r["latency_ms"]["p50"] for r in rows], "o-", label=label)
    machine = report.get("machine", {})
    peaks = [(f"{prov} fp32", p, "GFLOP/s") for prov, p in machine.get("peak", {}).items()]
    peaks += [(f"{prov} int8", p, "GOP/s") for prov, p in machine.get("peak_int8", {}).items()]
    for i, (name, peak, unit) in enumerate(peaks):
        ax1.axhline(peak["roofline_images_per_s"], color="gray", ls=("--", ":", "-.")[i % 3], lw=1,
                    label=f"{name} roofline ({peak['gflops']:.0f} {unit} matmul)")
    sizes = sorted({r["batch_size"] for r in report["results"]})
    for ax, ylabel in ((ax1, "images/s"), (ax2, "median latency per batch (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, Path(path), overwrite)
    plt.close(fig)
    return Path(path)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's scalable font (needs FreeType, as wheels have)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def confusion_matrix(matrix, classes: Sequence[str], path: str | Path, title: str = "",
                     overwrite: bool = False) -> Path:
    """Counts [true, predicted] as a heat map, each cell annotated, rows labelled with their recall.

    Drawn with Pillow, not matplotlib: classify writes it at the end of a run, where matplotlib's import and
    rendering (about a second) would cost more than classifying 30,000 images, and the inference-only
    install has no matplotlib."""
    import numpy as np
    from PIL import Image, ImageDraw

    cm = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # colour by the share of the true class
    font, big = _font(13), _font(16)
    rows = [f"{c} ({100 * share[i, i]:.0f}%)" if cm[i].sum() else c for i, c in enumerate(classes)]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))

    def width(text: str, f=font) -> int:
        box = probe.textbbox((0, 0), text, font=f)
        return int(box[2] - box[0])

    cell = max(44, max(width(str(int(v))) for v in cm.ravel()) + 10)
    left = max(width(r) for r in rows) + 40
    col_h = max(width(c) for c in classes) + 14
    top = 44 if title else 16
    w, h = left + n * cell + 16, top + n * cell + col_h + 30
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    if title:
        draw.text((w // 2, 14), title, fill="black", font=big, anchor="mt")
    light, dark = np.array([247, 251, 255]), np.array([8, 48, 107])  # matplotlib's "Blues", both ends
    for i in range(n):
        for j in range(n):
            x, y = left + j * cell, top + i * cell
            colour = tuple(int(c) for c in light + (dark - light) * share[i, j])
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(220, 220, 220))
            if cm[i, j]:
                ink = "white" if share[i, j] > 0.5 else "black"
                draw.text((x + cell // 2, y + cell // 2), str(int(cm[i, j])), fill=ink, font=font, anchor="mm")
        draw.text((left - 8, top + i * cell + cell // 2), rows[i], fill="black", font=font, anchor="rm")
    for j, name in enumerate(classes):  # column labels, written upwards
        label = Image.new("L", (width(name) + 4, 18), 0)
        ImageDraw.Draw(label).text((2, 9), name, fill=255, font=font, anchor="lm")
        label = label.rotate(90, expand=True)
        im.paste((0, 0, 0), (left + j * cell + (cell - label.width) // 2, top + n * cell + 6), label)
    draw.text((left + n * cell // 2, h - 6), "predicted", fill="black", font=font, anchor="mb")
    vertical = Image.new("L", (width("true class (recall)") + 4, 18), 0)
    ImageDraw.Draw(vertical).text((2, 9), "true class (recall)", fill=255, font=font, anchor="lm")
    vertical = vertical.rotate(90, expand=True)
    im.paste((0, 0, 0), (4, top + (n * cell - vertical.height) // 2), vertical)
    return atomic_write(path, lambda f: im.save(f, format="PNG"), overwrite)
