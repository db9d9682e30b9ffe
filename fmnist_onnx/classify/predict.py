"""What a worker, an inference process or a Ray actor runs on a chunk: decoded images -> the model -> rows
(top-k classes by logit with softmax scores, or an error row), encoded for the sink. No torch here."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fmnist_onnx import images
from fmnist_onnx.classify.contract import NON_FINITE, Rows
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import Row, encode, encode_csv_top1


def true_classes(paths: Sequence[str], known: dict[str, int] | None = None) -> np.ndarray:
    """images.true_class of each path as int16 (-1: none), looked up once per folder. ``known``: folder ->
    class, kept by the caller between chunks (a worker's reader, a Ray actor), filled here; None: this call's."""
    known = {} if known is None else known
    if os.altsep is None:  # POSIX: one separator
        folders = [p.rpartition(os.sep)[0] for p in paths]
    else:
        folders = [p[:max(p.rfind(os.altsep), p.rfind(os.sep))] for p in paths]
    for folder, path in zip(folders, paths, strict=True):  # new folders only: a dict lookup per path below
        if folder not in known:
            c = images.true_class(path)
            known[folder] = -1 if c is None else c
    return np.array([known[f] for f in folders], np.int16)


def row_truth(row: dict) -> int:
    """A row read back's true class (-1: none): its true_label column, or, in a table of an earlier version
    without it, the ImageFolder layout of its path."""
    if "true_label" in row:
        return -1 if row["true_label"] is None else CLASSES.index(row["true_label"])
    c = images.true_class(row["path"])
    return -1 if c is None else c


def make_rows(session, paths: Sequence[str], imgs: np.ndarray | None, errors: Sequence[str], top_k: int,
              batch_size: int, encoding: str, io_binding: bool = False, truth: Sequence[int] | None = None,
              known: dict[str, int] | None = None) -> Rows:
    """The model on a decoded chunk -> its Rows (``session`` may be None when every file failed). ``truth``:
    the true classes the source knows (None: from the paths, the ImageFolder layout; ``known`` as for
    ``true_classes``). The common case (CSV, top-1) is encoded straight from the arrays, without a Row object
    per file."""
    errors, ok, order, scores = _top_k(session, paths, imgs, errors, top_k, batch_size, io_binding)
    truth = true_classes(paths, known) if truth is None else np.asarray(truth, np.int16)
    data = None
    if encoding == "csv" and top_k == 1 and len(ok) == len(paths):
        data = encode_csv_top1(paths, order[:, 0].tolist(), scores[:, 0].tolist(), truth.tolist())
    if data is None:  # JSONL, top-k, error rows, or paths that need quoting or escaping: row by row
        return rows_of(_as_rows(paths, errors, ok, order, scores), encoding, top_k, truth)
    return Rows(data, order[:, 0].astype(np.int16), truth, errors, paths=paths)


def rows_of(rows: Sequence[Row], encoding: str, top_k: int, truth: Sequence[int] | None = None) -> Rows:
    """Rows made elsewhere (an engine's own, or an unlistable folder's) as a Rows chunk; ``truth`` as for
    ``make_rows``."""
    indices = np.array([r.indices[0] if not r.error else -1 for r in rows], np.int16)
    paths = [r.path for r in rows]
    truth = true_classes(paths) if truth is None else np.asarray(truth, np.int16)
    for r, t in zip(rows, truth.tolist(), strict=True):
        r.truth = t
    return Rows(encode(rows, encoding, top_k), indices, truth, [r.error for r in rows], paths=paths)


def _top_k(session, paths: Sequence[str], imgs: np.ndarray | None, errors: Sequence[str], top_k: int,
           batch_size: int, io_binding: bool) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(errors, ok, order, scores): the top-k classes by logit (ties: lowest index, as argmax) of the files
    ``ok`` (indices), with softmax scores. Logits that are not finite (a broken model) make an error, never a
    class."""
    errors = list(errors)
    ok = np.flatnonzero(np.array([not e for e in errors], dtype=bool))
    if not len(ok):
        return errors, ok, np.zeros((0, top_k), np.int64), np.zeros((0, top_k))
    x = images.to_model_input(imgs[ok])
    logits = np.concatenate([session.run(x[i:i + batch_size], io_binding=io_binding)
                             for i in range(0, len(x), batch_size)])
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():
        for i in ok[~finite].tolist():
            errors[i] = NON_FINITE
        ok, logits = ok[finite], logits[finite]
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    return errors, ok, order, np.take_along_axis(probs, order, axis=1)


def _as_rows(paths: Sequence[str], errors: list[str], ok: np.ndarray, order: np.ndarray,
             scores: np.ndarray) -> list[Row]:
    rows = [Row(p, error=e) if e else None for p, e in zip(paths, errors, strict=True)]
    for i, idx, sc in zip(ok.tolist(), order.tolist(), scores.tolist(), strict=True):
        rows[i] = Row(paths[i], idx, sc)
    return rows


def predict_rows(session, paths: Sequence[str], imgs: np.ndarray | None, errors: Sequence[str], top_k: int,
                 batch_size: int, io_binding: bool = False) -> list[Row]:
    """Rows for a decoded chunk: top-k classes by logit (ties: lowest index, as argmax) with softmax scores,
    or an error row (a file that failed, logits that are not finite)."""
    return _as_rows(paths, *_top_k(session, paths, imgs, errors, top_k, batch_size, io_binding))


def decoder_name() -> str:
    return "libspng (PNG) + Pillow" if images.pyspng is not None else "Pillow"
