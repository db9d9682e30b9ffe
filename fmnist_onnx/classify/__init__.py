"""classify: images -> a table of predictions, one row per image, with onnxruntime (pipeline.py tells how).

The package's layers, lowest first (tests/test_architecture.py holds them): contract (records and interfaces),
predict (a chunk through the model), run_files (a run's files and their owner), tally (counting, the summary),
request (the checks), resume, pipeline (the driver); beside them the registries of sources/ and engines/, whose
modules are imported only when chosen. The public names below are what callers use.
"""

from importlib import import_module

# name -> the module that defines it; imported on first use (PEP 562), so that the CLI can read the registries
# (engines/, sources/) for its --help without numpy and the pipeline
_HOMES = {
    "contract": ["BATCHED_MAX_CHUNK", "CRASHED", "DEFAULT_BATCH", "MAX_CHUNK", "Batch", "ClassifySummary", "Found",
                 "Request", "Rows", "RunIdentity"],
    "run_files": ["Run", "RunFiles", "confusion_png_path", "identity_path", "record_path"],
    "pipeline": ["classify"],
    "predict": ["decoder_name", "make_rows", "predict_rows", "rows_of"],
    "tally": ["Tally", "format_summary"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
