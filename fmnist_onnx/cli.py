"""The command line: one thin Click command per job. Heavy libraries are imported inside the commands,
so ``fmnist-onnx --help`` stays fast and the inference commands run without torch.

Exit codes: 0 success, 1 a check failed (verify, export), 2 usage errors and bad input, 3 some files failed
(classify), 4 classify's output could not be written (its journal keeps the rows), 5 the model failed mid-run
(classify: out of memory; the journal keeps the rows), 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM;
train's checkpoint, classify's journal kept). Each is the type of the exception that ends the command
(fmnist_onnx/errors.py), turned into its code by ``_Group.invoke`` alone.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from fmnist_onnx import __version__
from fmnist_onnx.classify.contract import BATCHED_MAX_CHUNK, DEFAULT_BATCH, INFERENCE_MODES, MAX_TOP_K
from fmnist_onnx.classify.engines import ENGINE_NAMES  # the registry: no engine imported
from fmnist_onnx.classify.engines import summary as engine_summary
from fmnist_onnx.errors import CheckFailed, CommandExit, Interrupted, UserError
from fmnist_onnx.runtime import PROVIDER_CHOICES  # the provider table: no onnxruntime import
from fmnist_onnx.spec import INVERT_MODES
from fmnist_onnx.table import FORMATS

DEFAULT_DIR = Path("artifacts")


class _Group(click.Group):
    """The one place where an exception becomes an exit code: a CommandExit anywhere below (UserError and its
    kinds, Interrupted) is one line on stderr and the code its type gives (errors.py), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as stop:  # a Ctrl-C that no command turned into its own (Click's: "Aborted!", 1)
            from fmnist_onnx.signals import signum_of

            e = Interrupted(signum_of(stop))
            click.echo(e.line(), err=True)
            ctx.exit(e.exit_code)
        except CommandExit as e:
            click.echo(e.line(), err=True)
            ctx.exit(e.exit_code)


def require_train_extra(command: str, *modules: str) -> None:
    """One line naming the extra to install where a command's libraries are missing: the inference-only
    install (core + [cpu] or [gpu]) has no torch, torchvision, onnx, onnxscript or matplotlib."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise UserError(f"fmnist-onnx {command} needs {', '.join(missing)}, not in the inference-only install: "
                        'pip install "fmnist-onnx[train]"')


def show_progress(quiet: bool) -> bool:
    """Progress goes to stderr unless --quiet: bars on a terminal, plain lines in a log (progress.py)."""
    return not quiet


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fmnist-onnx")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Train the PyTorch quickstart MLP on Fashion-MNIST, export it to ONNX, prove the export matches,
    classify image folders with onnxruntime, and benchmark inference.

    \b
    Typical flow:
      fmnist-onnx train                 # artifacts/model.pth, metrics.json, training_curves.png
      fmnist-onnx export                # artifacts/model.onnx, verified against PyTorch
      fmnist-onnx classify photos/ -o preds.csv
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---------------------------------------------------------------------------------------------- train

@cli.command(epilog="""\b
Examples:
  fmnist-onnx train                          # fast recipe, >= 89.5% in about 10 s on 2 cores
  fmnist-onnx train --recipe tutorial        # the tutorial as written (SGD 1e-3, batch 64): ~71%
  fmnist-onnx train --device cuda --epochs 20 --out-dir runs/long
  fmnist-onnx train --resume                 # continue after Ctrl-C
  fmnist-onnx train --overwrite              # train again over artifacts/model.pth
""")
@click.option("--recipe", type=click.Choice(["fast", "tutorial"]), default="fast", show_default=True,
              help="fast: in-memory tensors, AdamW, one-cycle schedule. tutorial: the quickstart as written.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [recipe's: 10].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size [fast: 512, tutorial: 64].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate [fast: 3e-3, tutorial: 1e-3].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="auto picks cuda, then mps, then cpu. An explicit device that is missing is an error.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same metrics (on the CPU).")
@click.option("--limit", type=click.IntRange(min=1),
              help="Train on the first N training images only (a quick try of a recipe or a set-up); the "
                   "test split is still evaluated whole.")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Fashion-MNIST folder (idx files, gzipped or not, or a torchvision root). "
                   "Default: $FMNIST_DATA, then /usr/share/datasets/fashion-mnist.")
@click.option("--download", is_flag=True, help="Let torchvision download the dataset if it is not found.")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_DIR,
              show_default=True, help="Where model.pth, metrics.json, training_curves.png go.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run checkpointed in --out-dir (with the "
              "--overwrite it started with).")
@click.option("--overwrite", "--restart", "overwrite", is_flag=True,
              help="Replace model.pth, metrics.json and training_curves.png in --out-dir, and discard an "
                   "interrupted run's checkpoint there (--restart: the same).")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
def train(recipe, epochs, batch_size, lr, device, seed, limit, data_dir, download, out_dir, resume, overwrite,
          quiet):
    """Train the quickstart MLP on Fashion-MNIST and write model.pth.

    Checkpoints after every epoch; Ctrl-C saves a checkpoint and exits 130, and --resume continues
    it to the same weights an uninterrupted run gives.
    """
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    require_train_extra("train", "torch", "torchvision", "matplotlib")
    _check_train(out_dir, data_dir, download, resume, overwrite)
    from fmnist_onnx import train as tr

    dev = tr.resolve_device(device)
    if not quiet:
        why = " (auto)" if device == "auto" else ""
        click.echo(f"device: {dev}{why}", err=True)
    cfg = tr.make_config(recipe, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=dev, limit=limit)
    result = tr.train(cfg, out_dir, data_dir=data_dir, download=download, resume=resume, overwrite=overwrite,
                      progress=show_progress(quiet), device=dev if resume else None)  # Interrupted: exit 128+N
    click.echo(f"{out_dir / 'model.pth'}: test accuracy {result.test_accuracy:.2f}% after "
               f"{len(result.history)} epochs in {result.seconds:.1f} s "
               f"(recipe {result.config.recipe}, {result.config.device})")


def _check_train(out_dir: Path, data_dir, download: bool, resume: bool, overwrite: bool) -> None:
    """train's usage errors before torch is imported (seconds) and before --out-dir is made: the checkpoint
    --resume continues, outputs (or an interrupted run) in the way, the dataset. train.py checks them again under
    its lock."""
    from fmnist_onnx.files import check_output
    from fmnist_onnx.spec import TRAIN_CHECKPOINT, TRAIN_OUTPUTS

    ckpt = out_dir / TRAIN_CHECKPOINT
    if resume and not os.path.lexists(ckpt):
        raise UserError(f"--resume: no checkpoint at {ckpt} (nothing was interrupted there)")
    if not resume and os.path.lexists(ckpt) and not overwrite:
        raise UserError(f"{ckpt} holds an interrupted run: pass --resume to continue it, or --overwrite to discard it")
    if not resume and out_dir.is_dir():
        for name in TRAIN_OUTPUTS:
            check_output(out_dir / name, overwrite)
    _check_dataset(data_dir, download)


def _check_dataset(data_dir, download: bool = False) -> None:
    """UserError, before torch is imported, where Fashion-MNIST is not found (unless --download may fetch it)."""
    if not download:
        from fmnist_onnx.data import find_root

        find_root(data_dir)


def _check_inputs(**named: Path) -> None:
    """UserError for an input file that does not exist, before the libraries that would read it are imported."""
    hints = {"weights": " (train one with `fmnist-onnx train`, or pass --weights)",
             "model": " (make one with `fmnist-onnx export`, or pass --model)"}
    for what, p in named.items():
        if not p.is_file():
            raise UserError(f"{what} file not found: {p}{hints.get(what, '')}")


# ---------------------------------------------------------------------------------------- export, verify, info

def _write_json(obj: dict, path: Path, overwrite: bool) -> None:
    import json

    from fmnist_onnx.files import atomic_write_text

    try:
        atomic_write_text(path, json.dumps(obj, indent=2) + "\n", overwrite)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _outputs(overwrite: bool, inputs: tuple, **named: Path | None) -> list[Path]:
    """The write policy's checks for a command's outputs (``--json=path``...), before any work: see files.py."""
    from fmnist_onnx.files import check_distinct, check_output

    given = {opt: p for opt, p in named.items() if p is not None}
    check_distinct(given.values())
    for opt, p in given.items():
        check_output(p, overwrite, inputs=[i for i in inputs if i is not None], what=f"--{opt.replace('_', '-')}")
    return list(given.values())


_OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace output files that exist (never an input).")
_QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress lines.")


_PROVIDER = click.option("--provider", "providers", type=click.Choice(PROVIDER_CHOICES), multiple=True,
                         default=("auto",), show_default=True,
                         help="onnxruntime execution provider to check on; repeatable. auto: cuda where "
                              "onnxruntime has it, else cpu. An explicit one that is missing is an error.")
_ATOL = click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
                     help="Absolute tolerance on logits (fp32).")
_RTOL = click.option("--rtol", type=click.FloatRange(min=0), default=1e-3, show_default=True,
                     help="Relative tolerance on logits (fp32): an element fails only beyond both.")
_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path),
                         help="Fashion-MNIST folder [$FMNIST_DATA, then /usr/share/datasets/fashion-mnist].")


@cli.command(epilog="""\b
Examples:
  fmnist-onnx export                               # artifacts/model.pth -> artifacts/model.onnx, verified
  fmnist-onnx export --weights model.pth --output model.onnx --opset 17
  fmnist-onnx export --quantize int8               # also artifacts/model.int8.onnx, if it keeps accuracy
  fmnist-onnx export --no-verify --json export.json
  fmnist-onnx export --overwrite                   # replace artifacts/model.onnx
""")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_DIR / "model.pth",
              show_default=True, help="The model.pth (this project's or the tutorial's own).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=DEFAULT_DIR / "model.onnx",
              show_default=True, help="The ONNX file to write.")
@click.option("--opset", type=int, help="ONNX opset, 9 or more [18]. Below 18 the TorchScript exporter is used.")
@click.option("--quantize", type=click.Choice(["int8"]),
              help="Also write an int8 model beside the output (NAME.int8.onnx), refused if it loses > 0.5 points.")
@click.option("--int8-method", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="static: QDQ calibrated on training images; dynamic: activations quantized at run time.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch (int8 is still measured).")
@_ATOL
@_RTOL
@_PROVIDER
@_DATA_DIR
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write what was done and measured as JSON.")
@_OVERWRITE
@_QUIET
def export(weights, output, opset, quantize, int8_method, no_verify, atol, rtol, providers, data_dir, json_path,
           overwrite, quiet):
    """Export model.pth to ONNX and prove it computes the same logits as PyTorch.

    The model takes [batch, 1, 28, 28] float32 in [0, 1] and gives [batch, 10] logits, with a symbolic batch
    axis, and carries its class names, preprocessing and provenance in its metadata. Unless --no-verify, it is
    checked on the 10,000 test images exactly as `fmnist-onnx verify` does, and not written (exit 1) when
    parity does not hold.
    """
    require_train_extra("export", "torch", "torchvision", "onnx", "onnxscript")
    _check_inputs(weights=weights)
    if quantize or not no_verify:
        _check_dataset(data_dir)  # the test images (verify), the calibration images (int8)
    from fmnist_onnx import export as ex
    from fmnist_onnx.files import locked
    from fmnist_onnx.progress import stages
    from fmnist_onnx.verify import format_report

    int8 = ex.int8_path(output) if quantize else None
    ex.check_outputs(weights, output, quantize, overwrite, also=(json_path,))
    say = stages("export", show_progress(quiet))
    say(f"loading torch and {weights} ...")  # at once: the imports alone take seconds
    with locked(output, int8, json_path):
        result = ex.export(weights, output, opset, verify=not no_verify, quantize=quantize, int8_method=int8_method,
                           atol=atol, rtol=rtol, providers=providers, data_dir=data_dir, overwrite=overwrite,
                           on_stage=say)
        if json_path:
            _write_json(result.to_dict(), json_path, overwrite)
    if result.verify is not None:
        click.echo(format_report(result.verify))
    if not result.written:
        raise CheckFailed(f"parity does not hold; {output} was not written")
    click.echo(f"{output}: opset {result.opset}, {'verified' if result.verify else 'NOT verified (--no-verify)'}"
               f", {result.seconds:.1f} s")
    if result.int8 is not None:
        q = result.int8
        line = (f"int8 ({q.method}): test accuracy {q.int8_accuracy_pct:.2f}% vs fp32 {q.fp32_accuracy_pct:.2f}% "
                f"({q.accuracy_change_points:+.2f} points), top-1 agreement {q.top1_agreement_pct:.2f}%")
        if not q.written:
            raise CheckFailed(f"{line}; refused, {q.path} not written: {'; '.join(q.failures)}")
        click.echo(f"{q.path}: {line}")


@cli.command(epilog="""\b
Examples:
  fmnist-onnx verify                               # artifacts/model.onnx against artifacts/model.pth
  fmnist-onnx verify --weights model.pth --model model.onnx --provider cpu --provider cuda
  fmnist-onnx verify --model artifacts/model.int8.onnx --json verify.json
  fmnist-onnx verify --atol 1e-5 --rtol 0 --samples 1000
""")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_DIR / "model.pth",
              show_default=True, help="The model.pth the ONNX model should compute.")
@click.option("-m", "--model", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_DIR / "model.onnx",
              show_default=True, help="The ONNX model (fp32, or int8: checked by top-1 agreement and accuracy).")
@_ATOL
@_RTOL
@_PROVIDER
@click.option("--samples", type=click.IntRange(min=1), help="Test images to use [all 10,000].")
@_DATA_DIR
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the report as JSON (also when it fails).")
@_OVERWRITE
@_QUIET
def verify(weights, model, atol, rtol, providers, samples, data_dir, json_path, overwrite, quiet):
    """Check that an ONNX model computes what model.pth computes, on the real test images.

    \b
    fp32: an element fails only where |a-b| > atol and |a-b| > rtol*|b| (Polygraphy's
    rule, b = PyTorch), and top-1 must agree on every image.
    int8: top-1 agreement >= 98% and accuracy within 0.5 points of PyTorch's.
    Exit 0 when parity holds on every provider, 1 when it does not.
    """
    require_train_extra("verify", "torch", "torchvision", "onnx")
    _check_inputs(model=model, weights=weights)
    _check_dataset(data_dir)
    from fmnist_onnx import verify as vf
    from fmnist_onnx.files import locked
    from fmnist_onnx.progress import stages

    _outputs(overwrite, (weights, model), json=json_path)
    say = stages("verify", show_progress(quiet))
    say(f"loading onnxruntime, torch and {weights} ...")  # at once: the imports alone take seconds
    with locked(json_path):
        report = vf.verify(model, weights, providers, atol, rtol, samples, data_dir, on_stage=say)
        if json_path:
            _write_json(report.to_dict(), json_path, overwrite)
    click.echo(vf.format_report(report))
    if not report.passed:
        raise CheckFailed(f"{model} does not match {weights}")


@cli.command(epilog="""\b
Examples:
  fmnist-onnx info artifacts/model.onnx
  fmnist-onnx info artifacts/model.int8.onnx --json
""")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_DIR / "model.onnx")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(model, as_json):
    """Show an ONNX model's signature, opset, metadata, size and parameters, and this machine's providers.

    Runs without torch.
    """
    import json
    from dataclasses import asdict

    from fmnist_onnx.info import read_model_info
    from fmnist_onnx.text import visible

    mi = read_model_info(model)
    if as_json:
        click.echo(json.dumps(asdict(mi), indent=2))
        return

    def sig(t):
        return visible(f"{t.name}: {t.type} [{', '.join(map(str, t.shape))}]")

    click.echo(f"{visible(mi.path)}  ({mi.file_size_bytes / 1e6:.2f} MB)")
    for t in mi.inputs:
        click.echo(f"  input       {sig(t)}")
    for t in mi.outputs:
        click.echo(f"  output      {sig(t)}")
    click.echo(f"  opset       {mi.opset} (IR version {mi.ir_version}), producer {visible(mi.producer or '?')}")
    click.echo(f"  parameters  {mi.parameters:,} ({'int8 quantized' if mi.quantized else 'fp32'})")
    if mi.metadata:
        click.echo("  metadata")
        for k, v in mi.metadata.items():
            if k == "classes":
                try:
                    v = ", ".join(json.loads(v))
                except (ValueError, TypeError):
                    pass
            click.echo(f"    {visible(k)}: {visible(v)}")  # the model's words: no escape reaches the terminal
    click.echo(f"  providers available here: {', '.join(mi.available_providers)}")


# ---------------------------------------------------------------------------------------------- bench

@cli.group(invoke_without_command=True, epilog="""\b
Examples:
  fmnist-onnx bench                            # artifacts/model.onnx, int8, and model.pth when present
  fmnist-onnx bench --full                     # the whole sweep: batch sizes 1 to 1024, 2 s each
  fmnist-onnx bench --batch-sizes 1,256 --duration 1 --json bench.json --plot bench.png
  fmnist-onnx bench --provider cuda --provider cpu --threads 2
  fmnist-onnx bench classify photos/           # the classify pipeline beside decoding alone
""")
@click.option("-m", "--model", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_DIR / "model.onnx",
              show_default=True, help="The ONNX model. int8: the .int8.onnx beside it, or quantized on the fly.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="model.pth: adds PyTorch eager (where torch is installed). "
                   "Default: model.pth beside --model, else artifacts/model.pth, when present.")
@click.option("--batch-sizes", help="Comma-separated batch sizes [1,64,1024; --full: 1,8,64,256,1024].")
@click.option("--provider", "providers", type=click.Choice(PROVIDER_CHOICES), multiple=True, default=("auto",),
              show_default=True, help="Repeatable. auto: cpu, plus cuda where onnxruntime has it.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads for onnxruntime and torch "
              "[onnxruntime: the cores this process may use, by affinity and cgroup quota; torch: its own default].")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Seconds of timed calls per measurement, after the first run and a warm-up [1; --full: 2].")
@click.option("--full", is_flag=True, help="The whole sweep: batch sizes 1,8,64,256,1024, 2 s each, and the peak "
              "on matrices up to 2048 (about 3x as long). --batch-sizes and --duration still win.")
@click.option("--no-int8", "no_int8", is_flag=True, help="Leave out onnxruntime int8 (and its peak).")
@click.option("--no-torch", "no_torch", is_flag=True, help="Leave out PyTorch eager, even where model.pth is found.")
@click.option("--torch-int8-peak", is_flag=True, help="Also time torch._int_mm for the int8 peak (seconds a call "
              "where torch has no fast int8 kernel); by default the int8 peak is onnxruntime's MatMulInteger.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the machine and all records as JSON.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), help="Write a PNG chart.")
@_OVERWRITE
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.pass_context
def bench(ctx, model, weights, batch_sizes, providers, threads, duration, full, no_int8, no_torch, torch_int8_peak,
          json_path, plot, overwrite, quiet):
    """Benchmark inference: onnxruntime fp32 and int8 (fp16, IO binding on CUDA) beside PyTorch eager.

    For each option and batch size: the first run (session creation + first inference) apart, then images/s,
    latency percentiles and GFLOP/s against the matrix-product peak of the same precision (fp32; int8: an int8
    product), measured at the start. By default a short run (batch sizes 1, 64, 1024, 1 s each); --full
    measures the whole sweep. The table says when other processes kept the machine busy meanwhile.
    """
    if ctx.invoked_subcommand is not None:
        return
    from fmnist_onnx import bench as bn
    from fmnist_onnx.files import locked

    sizes = bn.parse_batch_sizes(batch_sizes) if batch_sizes else list(
        bn.FULL_BATCH_SIZES if full else bn.DEFAULT_BATCH_SIZES)
    duration = duration or (bn.FULL_DURATION_S if full else bn.DEFAULT_DURATION_S)
    if weights is not None and no_torch:
        raise click.UsageError("--weights and --no-torch exclude each other")
    if weights is None and not no_torch:
        for candidate in (model.with_name("model.pth"), DEFAULT_DIR / "model.pth"):
            if candidate.is_file():
                weights = candidate
                break
    int8 = model.with_name(model.name.removesuffix(".onnx") + ".int8.onnx")
    _outputs(overwrite, (model, weights, int8), json=json_path, plot=plot)
    if show_progress(quiet):  # before onnxruntime is imported: a first line at once
        click.echo(f"bench {model}: batch sizes {', '.join(map(str, sizes))}, {duration:g} s each"
                   + ("" if full else "; --full for the whole sweep"), err=True)
    options = {"int8": not no_int8, "peak_sizes": bn.FULL_PEAK_SIZES if full else bn.PEAK_SIZES,
               "torch_int8_peak": torch_int8_peak}
    with locked(json_path, plot):
        _bench(model, weights, sizes, providers, threads, duration, json_path, plot, overwrite, quiet, options)


def _bench(model, weights, sizes, providers, threads, duration, json_path, plot, overwrite, quiet, options) -> None:
    from fmnist_onnx import bench as bn

    progress = show_progress(quiet)

    def on_record(rec):
        if progress:
            click.echo(f"  {rec.label} batch {rec.batch_size}: {rec.images_per_s:,.0f} images/s", err=True)

    def on_progress(line):
        if progress:
            click.echo(line, err=True)

    report = bn.run_benchmark(model, weights, sizes, providers, threads, duration, options["int8"], on_record,
                              peak_sizes=options["peak_sizes"], torch_int8_peak=options["torch_int8_peak"],
                              on_progress=on_progress)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(bn.format_table(report))
    if json_path:
        bn.save_json(report.to_json(), json_path, overwrite)
        click.echo(f"wrote {json_path}", err=True)
    if plot:
        from fmnist_onnx.plots import bench_chart

        bench_chart(report.to_json(), plot, title=f"{model.name} on {report.machine['cpu']}", overwrite=overwrite)
        click.echo(f"wrote {plot}", err=True)


@bench.command("classify", epilog="""\b
Examples:
  fmnist-onnx data export-png --split test --out test_png
  fmnist-onnx bench classify test_png/
  fmnist-onnx bench classify photos/ --workers 4 --repeats 3 --json classify_bench.json
  fmnist-onnx bench classify train_png/ --scaling     # images/s with 1, 2, 4, ... processes
  fmnist-onnx data export-png --split train --format tar --out shards
  fmnist-onnx bench classify shards/*.tar             # WebDataset shards (naive loop: tarfile)
  fmnist-onnx data export-png --split train --format parquet --out hf
  fmnist-onnx bench classify hf/train-00000-of-00001.parquet   # (naive loop: pyarrow rows)
  fmnist-onnx bench classify shop.parquet --image-column photo  # a table with several binary columns
""")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-m", "--model", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_DIR / "model.onnx",
              show_default=True, help="The ONNX model.")
@click.option("--workers", type=click.IntRange(min=1), help="Decoding processes [number of CPU cores].")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per onnxruntime call in the pipeline [as classify: 512 on the CPU, the chunk on CUDA].")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of each; the best counts.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Write the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("--scaling", is_flag=True, help="Also the pipeline with 1, 2, 4, ... decoding processes up to --workers.")
@click.option("--inference", type=click.Choice(INFERENCE_MODES), default="auto", show_default=True,
              help="classify's --inference: where the model runs (batched: the CUDA path's code, on any provider).")
@click.option("--image-column", metavar="NAME",
              help="classify's --image-column: the column of the Parquet inputs that holds the encoded images.")
@_OVERWRITE
def bench_classify(inputs, model, workers, provider, batch_size, repeats, json_path, quiet, scaling, inference,
                   image_column, overwrite):
    """Time the classify pipeline on INPUTS beside decoding alone and the naive loop.

    INPUTS are what classify takes: folders, image files, tar and zip archives, Parquet files (or a mix, with
    --image-column), folders of shards and brace patterns, checked as classify checks them; an image classify
    gives an error row, the naive loop skips. The pipeline (find, decode, infer, write) in images/s, beside
    decoding alone (classify's own decoder, the images read through the same source, in the same processes and
    in one) and the naive loop (one process, Pillow, batches of 256, the images read the plain way for their
    layout: files, tarfile, zipfile, pyarrow rows), on the same images in one run: how close the pipeline runs
    to its decoding limit. Then the coordinator (the process that walks and writes): its CPU per file and
    start-up CPU, from two fresh runs, and the ceiling they imply on any number of cores; with --scaling,
    images/s for 1, 2, 4, ... processes.
    """
    from fmnist_onnx import bench as bn
    from fmnist_onnx.files import locked

    progress = show_progress(quiet)

    def on_record(rec):
        if progress:
            click.echo(f"  {rec.what}: {rec.images_per_s:,.0f} images/s", err=True)

    _outputs(overwrite, (model, *map(Path, inputs)), json=json_path)
    if image_column is not None:
        from fmnist_onnx.classify.sources import kind_of

        if not any(kind_of(p) == "parquet" for p in inputs):
            raise click.UsageError("--image-column is for Parquet inputs, and none of INPUTS is a .parquet file")
    for folder in filter(os.path.isdir, inputs):
        if json_path is not None and os.path.realpath(json_path).startswith(os.path.realpath(folder) + os.sep):
            raise UserError(f"--json {json_path} is inside {folder}, the folder measured; write it elsewhere")
    with locked(json_path):
        result = bn.bench_classify(inputs, model, workers, provider, batch_size, repeats, on_record=on_record,
                                   scaling=scaling, inference=inference, image_column=image_column)
        if json_path:
            bn.save_json(result, json_path, overwrite)
    click.echo(bn.format_classify(result))
    if json_path:
        click.echo(f"wrote {json_path}", err=True)


# ---------------------------------------------------------------------------------------------- classify

@cli.command(epilog="""\b
Examples:
  fmnist-onnx classify photos/ -o preds.csv
  fmnist-onnx classify shop/*.jpg --top-k 3 -o preds.jsonl
  fmnist-onnx classify test_pngs/ -o preds.parquet      # ImageFolder layout: accuracy + confusion matrix
  fmnist-onnx classify photos/ -o preds.csv --resume    # finish a killed run
  fmnist-onnx classify photos/ | head                   # CSV on stdout, progress on stderr
  fmnist-onnx classify shards/*.tar -o preds.csv        # WebDataset shards, read in place
  fmnist-onnx classify shards/ -o preds.csv             # a folder of shards (no image in it): all of them
  fmnist-onnx classify 'shards/train-{000000..000005}.tar' -o preds.csv   # WebDataset's brace pattern
  fmnist-onnx classify my_hub_dataset/ -o preds.csv     # a Hub dataset's folder: its data/*.parquet
  fmnist-onnx classify train-00000.parquet -o preds.csv # Hugging Face layout: an image column, a label
  fmnist-onnx classify shop.parquet --image-column photo -o preds.csv   # a table with several binary columns
  fmnist-onnx classify /data/shop/ -o preds.parquet --engine ray --ray-address auto   # on a Ray cluster
\b
Exit codes: 0 every file classified, 3 some files failed (rows with an error), 2 usage errors (and
inputs that hold no image: the line says what they hold),
4 the output could not be written (a full disk: free space, run again with --resume),
5 the model could not be run mid-run (onnxruntime out of memory: the rows so far are kept, run again
with --resume), 130 interrupted by Ctrl-C, 143 terminated by SIGTERM (either way: run again with --resume).
""")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-m", "--model", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_DIR / "model.onnx",
              show_default=True, help="The ONNX model (from `fmnist-onnx export`).")
@click.option("-o", "--output", default="-", show_default=True,
              help="Table to write: .csv, .jsonl or .parquet; '-' writes CSV to stdout.")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="Table format, when the --output suffix does not say it.")
@click.option("-k", "--top-k", type=click.IntRange(1, MAX_TOP_K), default=1, show_default=True,
              help="Also write the next K-1 classes and their scores.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help=f"Images per onnxruntime call [{DEFAULT_BATCH} where the decoding processes run the model (the "
                   f"CPU); the whole chunk, up to {BATCHED_MAX_CHUNK}, in the batched stage (CUDA)].")
@click.option("--workers", type=click.IntRange(min=1), help="Decoding processes [number of CPU cores].")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="auto: the provider measured faster for classify (the CPU, until CUDA is: see --json's "
                   "provider_reason). An explicit cuda that is missing is an error.")
@click.option("--inference", type=click.Choice(INFERENCE_MODES), default="auto", show_default=True,
              help="Where the model runs: in the decoding processes (the CPU's way), or in inference processes "
                   "after them, on whole chunks (CUDA's way; with --provider cpu too, e.g. to test it). auto: the "
                   "provider's way.")
@click.option("--invert", type=click.Choice(INVERT_MODES), default="auto", show_default=True,
              help="auto: invert images with a light border (dark object on a light background, like a product "
                   "photo) to Fashion-MNIST's light-on-dark.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run's output (<output>.partial).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output or interrupted run.")
@click.option("--no-recursive", is_flag=True, help="Only the files directly inside each folder (a folder of "
              "shards too: its shards in subfolders are not searched).")
@click.option("--image-column", metavar="NAME",
              help="The column of the Parquet inputs that holds the encoded images: a binary column, or a struct "
                   "with a binary 'bytes' field (the Hugging Face layout) [the 'image' column, else the only "
                   "binary column].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (not with -o -).")
@click.option("--engine", type=click.Choice(ENGINE_NAMES), default="local", show_default=True,
              help=". ".join(map(engine_summary, ENGINE_NAMES)) + ". On one 2-core machine Ray "
                   "was 10-18x slower than local on 10,000 PNGs (5-8x on 60,000): it is for clusters, never the "
                   "default.")
@click.option("--ray-address", help="With --engine ray: the cluster ('auto', HOST:PORT, ray://HOST:10001) "
                                    "[default: $RAY_ADDRESS, else a local Ray runtime, stopped at the end].")
@click.option("--actors", type=click.IntRange(min=1), help="With --engine ray: actors, each with one onnxruntime "
              "session [cluster's CPUs; with --provider cuda, its GPUs].")
@click.option("-q", "--quiet", is_flag=True, help="No progress display and no provider line.")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write an HTML report of the run (self-contained: open it in a browser); the same page "
                   "as `fmnist-onnx report` makes of the output.")
def classify(paths, model, output, fmt, top_k, batch_size, workers, provider, invert, resume, overwrite,
             no_recursive, image_column, as_json, engine, ray_address, actors, quiet, report_path, inference):
    """Classify image files and folders into a table of predictions, one row per file.

    PATHS are folders (searched recursively) and image files, in any format Pillow reads (PNG, JPEG, BMP,
    WebP, ...), other files in the folders skipped and counted; and archives and tables of images, read in
    place: tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .txz, ...), .zip, and .parquet with a column of image
    bytes. An image inside one is named <archive>::<member> or <file.parquet>::row/<N>. A folder with no image
    file under it (as far as --no-recursive lets the search go) and at least one archive or Parquet file is a
    folder of shards: they are read as if named one by one, in name order (depth first), its other files
    skipped; in a folder with images they are skipped, and the summary names them. A PATH that does not exist
    is a brace pattern, expanded as WebDataset expands it ('train-{000000..000005}.tar': quote it; at most
    100,000 names, each of which must exist), and kept as named for --resume. Any size and mode is made 28x28
    grayscale (aspect kept, padded). Columns: path, label, index, score (softmax), label_2, score_2 ... with
    --top-k, error (a file that cannot be read gets its error and no label, and the run goes on), and
    true_label. Where the inputs know the true class (a folder per class name, '/' written as '-'; a .cls
    sidecar in a tar; a Parquet label column) the summary adds accuracy, precision and recall, and a
    confusion-matrix PNG is written beside the output.

    Rows go to <output>.partial as they are made and the output gets its name only when complete: a
    killed run continues with --resume. An existing output is never replaced without --overwrite.
    """
    from fmnist_onnx import classify as cl

    _check_classify_options(output, as_json, report_path, overwrite, model, paths, engine,
                            ray_address or actors, workers or inference != "auto", image_column, not no_recursive)

    def on_provider(name: str) -> None:
        if not quiet:
            why = " (auto)" if provider == "auto" else ""
            click.echo(f"provider: {name}{why}", err=True)

    def on_summary(s) -> None:  # under the run's locks (the output's, the --report page's, taken before any work)
        _show_run(s, as_json, report_path, model, invert, overwrite, image_column)

    options = {"address": ray_address, "actors": actors} if engine == "ray" else \
        {"workers": workers, "inference": inference}
    try:
        s = cl.classify(paths, model, output, fmt=fmt, top_k=top_k, batch_size=batch_size, provider=provider,
                        invert=invert, resume=resume, overwrite=overwrite, recursive=not no_recursive,
                        progress=show_progress(quiet), on_provider=on_provider, report=report_path,
                        engine=engine, image_column=image_column, on_summary=on_summary, **options)
    except BrokenPipeError:  # `classify ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        click.get_current_context().exit(141)
    click.get_current_context().exit(3 if s.failed else 0)  # 3: some files failed (their rows say why)


def _check_classify_options(output, as_json, report_path, overwrite, model, paths, engine, ray_options,
                            local_options, image_column, recursive) -> None:
    """classify's usage errors, and the --report page's place, before the run (not after an hour of work)."""
    if as_json and output == "-":
        raise click.UsageError("--json prints the summary on stdout, where -o - writes the table: use -o FILE")
    if report_path and output == "-":
        raise click.UsageError("--report is made from the output table: use -o FILE")
    if report_path:
        from fmnist_onnx.report import check_destination

        # classify's --overwrite; never an input or another output
        check_destination(report_path, overwrite, inputs=[model, *paths], outputs=[output])
    if engine == "local" and ray_options:
        raise click.UsageError("--ray-address and --actors are for --engine ray")
    if engine == "ray" and local_options:
        raise click.UsageError("--workers and --inference are for --engine local; with --engine ray, use --actors")
    if image_column is not None:
        from fmnist_onnx.classify.run_files import RunFiles
        from fmnist_onnx.classify.sources import kinds

        # a folder of Parquet shards, a pattern of Parquet files: Parquet inputs too (the run's own files left out)
        if "parquet" not in kinds(paths, recursive, RunFiles.of(output, report_path).all()):
            raise click.UsageError("--image-column is for Parquet inputs, and none of PATHS is a .parquet file (or "
                                   "a folder of them)")


def _show_run(s, as_json, report_path, model, invert, overwrite, image_column) -> None:
    """The summary (text on stderr, or JSON on stdout: stdout holds data alone), then the --report page: the
    run's last file, written while its locks are held (classify calls this last, run_files.Run)."""
    import json
    from dataclasses import asdict

    from fmnist_onnx.classify import format_summary

    if as_json:
        click.echo(json.dumps(asdict(s), indent=2))
    else:
        click.echo(format_summary(s), err=True)
    if report_path:
        from fmnist_onnx.report import build_report
        from fmnist_onnx.text import visible

        r = build_report(s.output, report_path, model=model, invert=invert, run=s, overwrite=overwrite,
                         what="--report", image_column=image_column)
        click.echo(f"report: {visible(r.path)} ({r.bytes / 1e6:.1f} MB, {r.seconds:.1f} s)", err=True)


@cli.command(epilog="""\b
Examples:
  fmnist-onnx report preds.csv                      # preds.report.html, beside the table
  fmnist-onnx report preds.parquet -o report.html -m artifacts/model.int8.onnx
  fmnist-onnx classify test_pngs/ -o preds.csv --json > run.json
  fmnist-onnx report preds.csv --summary run.json   # the same page as classify --report
""")
@click.argument("predictions", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="The HTML file to write [PREDICTIONS' name with .report.html].")
@click.option("-m", "--model", type=click.Path(path_type=Path, dir_okay=False),
              help="The ONNX model of the run, for its metadata [artifacts/model.onnx when it exists].")
@click.option("--invert", type=click.Choice(INVERT_MODES), default="auto", show_default=True,
              help="The run's --invert: the images are drawn as the model saw them.")
@click.option("--summary", "summary_path", type=click.Path(path_type=Path, dir_okay=False),
              help="The JSON that `classify --json` printed: adds what the table does not hold (provider, "
                   "speed, skipped files).")
@click.option("--image-column", metavar="NAME",
              help="The run's --image-column: the images of Parquet rows are read from that column.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report (never one of the inputs).")
def report(predictions, output, model, invert, summary_path, image_column, overwrite):
    """Make an HTML report of a classify output (CSV, JSONL or Parquet): one self-contained file.

    The run's counts and model; on labelled folders (ImageFolder layout) accuracy, precision and recall, and
    the confusion matrix, whose cells show their files; the least confident predictions and the most
    confident mistakes, each drawn as the model saw it (28x28) beside the original; the failed files and
    their errors. Images are embedded: no network, no server. Samples keep it under 20 MB for any number of
    rows; the table is read streaming. An existing page is replaced only with --overwrite, and never one of
    the inputs (the table, the model, the summary, the confusion PNG, an image the table names).
    """
    from fmnist_onnx import report as rp
    from fmnist_onnx.text import visible

    if model is None and (DEFAULT_DIR / "model.onnx").is_file():
        model = DEFAULT_DIR / "model.onnx"
    from fmnist_onnx.files import locked

    dest = output or rp.default_output(predictions)
    with locked(dest):
        r = rp.build_report(predictions, dest, model=model, invert=invert, summary=summary_path, overwrite=overwrite,
                            image_column=image_column)
    click.echo(f"wrote {visible(r.path)}: {r.rows:,} rows, {r.figures:,} images drawn, {r.bytes / 1e6:.1f} MB, "
               f"{r.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------- data

@cli.group()
def data() -> None:
    """Fashion-MNIST as files, for demos, tests and benchmarks."""


@data.command("export-png", epilog="""\b
Examples:
  fmnist-onnx data export-png --out test_pngs                 # 10,000 test images
  fmnist-onnx data export-png --split train --out train_pngs  # 60,000 images, for benchmarks
  fmnist-onnx data export-png --out sample --limit 100
  fmnist-onnx data export-png --split train --format tar --out shards   # shards/train-000000.tar .. -000005.tar
  fmnist-onnx data export-png --format tar --shard-size 1000 --out shards
  fmnist-onnx data export-png --split train --format parquet --out hf   # hf/train-00000-of-00001.parquet
""")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write into: <class>/<index>.png (png), <split>-NNNNNN.tar (tar), "
                   "<split>-00000-of-00001.parquet (parquet).")
@click.option("--format", "fmt", type=click.Choice(["png", "tar", "parquet"]), default="png", show_default=True,
              help="png: a PNG file per image, a folder per class (ImageFolder). tar: WebDataset shards, "
                   "<index>.png and <index>.cls per sample. parquet: the Hugging Face layout (image, label).")
@click.option("--shard-size", type=click.IntRange(min=1),
              help="--format tar: images per shard [10000].")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images of the split.")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Fashion-MNIST folder (as for train). Default: $FMNIST_DATA, then Debian's.")
@click.option("--overwrite", is_flag=True,
              help="png: write into a folder that is not empty. tar, parquet: replace the split's files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
def export_png(split, out, fmt, shard_size, limit, data_dir, overwrite, quiet):
    """Write a Fashion-MNIST split as PNG images: files in the ImageFolder layout (a folder per class), or
    WebDataset tar shards, or a Hugging Face Parquet file.

    png: class names become folder names with '/' written as '-' (T-shirt-top). Files are named by their index
    in the split, so classify's rows can be matched back to the dataset. tar: shards of --shard-size images,
    each image two members, 00042.png (the same PNG bytes) and 00042.cls (its class index); the same bytes on
    every run. parquet: columns image {bytes, path} and label, with the class names in the features that
    `datasets` reads (load_dataset("parquet", ...)). Each shard or file appears whole or not at all.
    """
    if shard_size is not None and fmt != "tar":
        raise UserError("--shard-size applies to --format tar only")
    out = _export_folder(out)
    require_train_extra("data export-png", "torch", "torchvision")  # the dataset is read through torchvision
    from importlib.util import find_spec

    if fmt == "parquet" and find_spec("pyarrow") is None:  # said before torch is imported and the split read
        raise UserError('--format parquet needs pyarrow: pip install pyarrow (or "fmnist-onnx[parquet]")')
    if fmt == "png" and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose another --out, or --overwrite to write into it")
    _check_dataset(data_dir)
    from fmnist_onnx.progress import stages

    stages("data export-png", show_progress(quiet))(f"loading torch and the {split} split ...")  # at once
    from fmnist_onnx.data import load_split
    from fmnist_onnx.files import locked

    s = load_split(split == "train", data_dir)
    pixels, labels = s.images.numpy(), s.labels.numpy()
    if limit:
        pixels, labels = pixels[:limit], labels[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out):  # <out>.lock, beside the folder
        _export(fmt, pixels, labels, out, split, shard_size, overwrite, show_progress(quiet))


def _export_folder(out: Path) -> Path:
    """--out as a folder with a name, for the lock beside it: '.' or '..' by its absolute path; '/' refused."""
    if out.name in ("", ".."):
        out = Path(os.path.abspath(out))
    if not out.name:
        raise UserError(f"--out {out}: the root folder; name a folder to write into")
    return out


def _export(fmt, pixels, labels, out: Path, split: str, shard_size, overwrite: bool, progress: bool) -> None:
    """export-png's writing, in the format asked, and its one line on stdout."""
    from fmnist_onnx import layouts
    from fmnist_onnx.files import check_locks
    from fmnist_onnx.images import ImageError
    from fmnist_onnx.images import export_png as write_pngs

    if fmt == "png":
        try:
            n = write_pngs(pixels, labels, out, overwrite=overwrite, progress=progress)
        except ImageError as e:
            raise UserError(str(e)) from None
        except OSError as e:  # a full disk, an I/O error: exit 4, as classify's
            from fmnist_onnx.files import OutputError

            raise OutputError(f"cannot write into {out}: {e.strerror or e}; the PNG files written before it "
                              "are complete, and kept") from None
        check_locks()  # each PNG is renamed by images.py, not files.publish: a lock lost meanwhile is told here
        click.echo(f"wrote {n} PNG files to {out} ({split} split, ImageFolder layout)")
    elif fmt == "tar":
        w = layouts.export_tar(pixels, labels, out, split, shard_size or layouts.SHARD_SIZE, overwrite, progress)
        names = w.files[0].name if len(w.files) == 1 else f"{w.files[0].name} .. {w.files[-1].name}"
        click.echo(f"wrote {len(w.files)} tar shards, {w.images} images, to {out}: {names} ({split} split, "
                   "WebDataset)")
        for p in w.removed:
            click.echo(f"removed {p.name}, a shard of an earlier export", err=True)
        for p, why in w.kept:
            click.echo(f"kept {p.name}: {why}", err=True)
    else:
        w = layouts.export_parquet(pixels, labels, out, split, overwrite=overwrite, progress=progress)
        click.echo(f"wrote {w.files[0]}: {w.images} images ({split} split, Hugging Face Parquet)")


def main() -> None:
    from fmnist_onnx.errors import exit_at_once_on_signals

    exit_at_once_on_signals()
    cli(prog_name="fmnist-onnx")


if __name__ == "__main__":
    main()
