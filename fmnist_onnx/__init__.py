"""fmnist-onnx: from the PyTorch quickstart MLP to a verified, fast ONNX deployment."""

import os

# onnxruntime keeps telemetry unless this is set when it is imported: a queue of events under the user's cache
# (~/.cache/Microsoft/DeveloperTools/.onnxruntime: a database and a device id), a thread, and uploads. Set here,
# before any module can import onnxruntime, for the command line and library users alike; a user's own
# ORT_DISABLE_TELEMETRY=0 turns it back on (docs/reliability.md), Ray actors included (engines/ray.py).
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
os.environ.setdefault(TELEMETRY_ENV, "1")

# torch's OpenMP threads (GNU libgomp in the Linux wheels: torch's own, MKL's and oneDNN's loops) spin for
# 300,000 turns at every barrier before they sleep. Beside other busy processes a spinning thread holds the core
# that the thread with the work needs, and a small MLP meets thousands of barriers: `train --epochs 3` took
# 136 s beside two busy processes on 2 cores, against 11.4 s quiet (fair share: 2x). libgomp reads the spin
# count once, when torch loads it: set here, before any module can import torch. A user's own GOMP_SPINCOUNT,
# or OMP_WAIT_POLICY (which GOMP_SPINCOUNT would override), wins (docs/reliability.md). Why 10,000, by a sweep
# of `train --epochs 3` on 2 cores (medians; docs/reliability.md): quiet 0 cost 14% against libgomp's default,
# 1,000 9%, 10,000 5%; beside two busy processes 10,000 still took 1.15x its fair share (0: 0.94x).
SPIN_ENV = "GOMP_SPINCOUNT"
SPIN_COUNT = "10000"
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault(SPIN_ENV, SPIN_COUNT)

__version__ = "0.1.0"
