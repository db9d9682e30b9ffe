"""The request's checks, once, for every engine: options, inputs (by their sources), model, output, and the
files the run will write (run_files.RunFiles), each a one-line UserError before any work. The output's state (a
journal, a finished output) is checked under its lock, when the run's files are opened (run_files.Run)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fmnist_onnx.classify import engines, sources
from fmnist_onnx.classify.contract import MAX_TOP_K, Request, RunIdentity
from fmnist_onnx.classify.run_files import RunFiles, recorded_writes
from fmnist_onnx.errors import UserError
from fmnist_onnx.files import same_file
from fmnist_onnx.images import image_extensions
from fmnist_onnx.journal import check_writable
from fmnist_onnx.spec import INVERT_MODES
from fmnist_onnx.table import format_for
from fmnist_onnx.text import visible


def _check_not_inputs(own: Sequence[str], roots: Sequence[str], model: str) -> None:
    """No file the run writes may be the model or a file named as an input, even with --overwrite (files
    inside input folders: ``_check_not_walked``)."""
    named = [r for r in roots if not os.path.isdir(r)]
    if len(named) > 1000:  # a shell glob: compare real paths, not a stat per pair
        real = {os.path.realpath(r): r for r in named}
        named = [real[r] for r in (os.path.realpath(o) for o in own) if r in real]
    for out in own:
        for i in [model, *named]:
            if same_file(out, i):
                raise UserError(f"{visible(out)} would be written by this run but is also one of its inputs "
                                f"({visible(i)}); write the output elsewhere")


def _check_not_walked(own: Sequence[str], roots: Sequence[str], recursive: bool, known: frozenset[str],
                      names: dict[str, str]) -> tuple[str, ...]:
    """No file the run writes may be an image the walk of an input folder reads (an input of the run, even with
    --overwrite), unless an earlier run's record names it as that run's own (``known``: the confusion PNG, the
    --report page). The files the walk leaves out: the run's own, less those images (none, once this passed;
    a folder reached only through a link inside an input is not seen here: the walk reads its images)."""
    exts = image_extensions()
    folders = [(os.path.realpath(r), r) for r in roots if os.path.isdir(r)]
    theirs = [o for o in own if os.path.lexists(o) and os.path.splitext(o)[1].lower() in exts
              and os.path.abspath(o) not in known]
    for out in theirs:
        where = os.path.realpath(os.path.dirname(os.path.abspath(out)))
        for real, root in folders:
            if where == real or (recursive and where.startswith(real.rstrip(os.sep) + os.sep)):
                raise UserError(f"{names.get(out, 'a file of this run')} {visible(out)} is an image in the input "
                                f"folder {visible(root)}, which the run reads: an input, never written over, even "
                                "with --overwrite; write it elsewhere")
    return tuple(o for o in own if o not in theirs)


def check_request(paths: Sequence[str | Path], model: str | Path, output: str | Path = "-", fmt: str | None = None,
                  top_k: int = 1, batch_size: int | None = None, invert: str = "auto", recursive: bool = True,
                  resume: bool = False, overwrite: bool = False, provider: str = "auto",
                  report: str | Path | None = None, engine: str = "local",
                  image_column: str | None = None) -> Request:
    """The checks every engine makes before any work, each a one-line UserError. The state of the output
    (a journal, a finished output) is checked under the output's lock, by run_files.Run.
    ``image_column``: the Parquet inputs' column of images (--image-column; None: the source's rule)."""
    from fmnist_onnx.runtime import PROVIDER_CHOICES

    output = os.fspath(output)
    fmt = format_for(output, fmt)
    if not 1 <= top_k <= MAX_TOP_K:
        raise UserError(f"--top-k must be between 1 and {MAX_TOP_K}")
    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if invert not in INVERT_MODES:
        raise UserError(f"--invert must be one of {', '.join(INVERT_MODES)}")
    if provider not in PROVIDER_CHOICES:
        raise UserError(f"unknown provider {provider!r}; choose {', '.join(PROVIDER_CHOICES)}")
    if output == "-" and resume:
        raise UserError("--resume needs an --output file (stdout cannot be resumed)")
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    files = RunFiles.of(output, report)
    own = files.all()
    roots = sources.check_inputs(paths, engines.entry(engine).sources, engine, image_column, recursive, own)
    if not Path(model).is_file():
        raise UserError(f"model file not found: {model} (make one with `fmnist-onnx export`)")
    named = sources.names(roots)  # the files a pattern names, too
    _check_not_inputs(own, named, os.fspath(model))
    names = {} if output == "-" else {output: "--output", os.fspath(files.confusion_png): "the confusion matrix"}
    names.update({os.fspath(report): "--report"} if report is not None else {})
    walk_skips = _check_not_walked(own, named, recursive, recorded_writes(files), names)
    if output != "-":
        check_writable(output)  # a read-only folder, a device: refused before any work
    # the model's hash only where there is a journal to resume
    writes = [p for p in names if p != output]  # what the record names as this run's own, for later runs
    identity = (RunIdentity.of(model, invert, top_k, recursive, roots, image_column, writes)
                if output != "-" else None)
    return Request(roots, os.fspath(model), output, fmt, top_k, batch_size, invert, recursive, resume, overwrite,
                   provider, identity, walk_skips, image_column)

