"""fmnist-onnx: from the PyTorch quickstart MLP to a verified, fast ONNX deployment."""

import os

# onnxruntime keeps telemetry unless this is set when it is imported: a queue of events under the user's cache
# (~/.cache/Microsoft/DeveloperTools/.onnxruntime: a database and a device id), a thread, and uploads. Set here,
# before any module can import onnxruntime, for the command line and library users alike; a user's own
# ORT_DISABLE_TELEMETRY=0 turns it back on (docs/reliability.md), Ray actors included (engines/ray.py).
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
os.environ.setdefault(TELEMETRY_ENV, "1")

__version__ = "0.1.0"
