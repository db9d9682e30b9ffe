"""PNG charts for what people would rather look at than read. matplotlib is imported lazily."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def training_curves(history: Sequence, path: str | Path, title: str = "") -> Path:
    """Train/test loss and test accuracy per epoch (records with epoch, train_loss, test_loss, test_accuracy)."""
    plt = _pyplot()
    epochs = [h.epoch for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    ax1.plot(epochs, [h.test_loss for h in history], "o-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [h.test_accuracy for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, Path(path))
    plt.close(fig)
    return Path(path)


def bench_chart(report: dict, path: str | Path, title: str = "") -> Path:
    """Images/s and median latency against batch size, one line per option, with the fp32 roofline(s).

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
    for i, (prov, peak) in enumerate(report.get("machine", {}).get("peak", {}).items()):
        ax1.axhline(peak["roofline_images_per_s"], color="gray", ls=("--", ":")[i % 2], lw=1,
                    label=f"{prov} fp32 roofline ({peak['gflops']:.0f} GFLOP/s matmul)")
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
    _save(fig, Path(path))
    plt.close(fig)
    return Path(path)


def confusion_matrix(matrix, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Counts [true, predicted] as a heat map, each cell annotated, rows labelled with their recall."""
    import numpy as np

    plt = _pyplot()
    cm = np.asarray(matrix)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(8.5, 7))
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # colour by the share of the true class
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    recall = [f"{c} ({100 * share[i, i]:.0f}%)" if cm[i].sum() else c for i, c in enumerate(classes)]
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), recall)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class (recall)")
    if title:
        ax.set_title(title)
    _save(fig, Path(path))
    plt.close(fig)
    return Path(path)
