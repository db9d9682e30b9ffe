"""The engines' registry: the one place engine names live. An engine runs the model on the chunks the pipeline
gives it (contract.Engine) somewhere: ``local`` in worker processes on this machine (the default), ``ray`` on a
Ray cluster. Each is imported only when chosen, so that the default install never imports Ray.

Adding an engine: a module here with a class that takes ``(request, **options)`` and fills contract.Engine (a
context manager: made cheaply, started by ``with``, stopped at its end), and an entry below naming it and the
sources it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from fmnist_onnx.errors import UserError


@dataclass(frozen=True)
class EngineEntry:
    module: str  # imported when the engine is chosen
    cls: str
    sources: tuple[str, ...]  # the sources (sources.SOURCES) whose inputs it reads
    summary: str  # for --help
    install: str = ""  # what to install where its framework is missing


ENGINES: dict[str, EngineEntry] = {
    "local": EngineEntry("fmnist_onnx.classify.engines.local", "LocalEngine",
                         ("folder", "tar", "zip", "parquet"),
                         "worker processes on this machine"),
    "ray": EngineEntry("fmnist_onnx.classify.engines.ray", "RayEngine",
                       ("folder", "uri", "tar", "zip", "parquet"),
                       "Ray actors on a cluster; same rows, in the order they are "
                       "done", install='pip install "fmnist-onnx[ray]"'),
}
ENGINE_NAMES = tuple(ENGINES)


def entry(name: str) -> EngineEntry:
    try:
        return ENGINES[name]
    except KeyError:
        raise UserError(f"unknown engine {name!r}; choose {', '.join(ENGINES)}") from None


def open_engine(name: str, request, **options):
    """The engine ``name`` for ``request`` (contract.Engine), its options checked, not started yet: ``with``
    starts it. Its framework is imported only here."""
    e = entry(name)
    return getattr(import_module(e.module), e.cls)(request, **options)


def summary(name: str) -> str:
    """The engine in a few words, with what to install for it: the CLI's help."""
    e = ENGINES[name]
    return f"{name}: {e.summary}" + (f" ({e.install})" if e.install else "")
