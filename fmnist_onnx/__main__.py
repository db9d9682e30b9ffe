"""``python -m fmnist_onnx`` and the ``fmnist-onnx`` script: Ctrl-C and SIGTERM are handled before the first
import (one line, exit 130 or 143), and onnxruntime's telemetry is off before it can be imported (the package's
``__init__``, which runs before this module, sets ORT_DISABLE_TELEMETRY)."""

try:
    from fmnist_onnx.errors import exit_at_once_on_signals

    exit_at_once_on_signals()
except KeyboardInterrupt:  # Ctrl-C in the few microseconds before the handler is in place
    import os

    os.write(2, b"Interrupted.\n")
    os._exit(130)


def main() -> None:
    from fmnist_onnx.testing import MAIN_STARTED, pause_point

    pause_point(MAIN_STARTED)  # tests hold the process here: the signals' handler is in place (testing.py)
    from fmnist_onnx.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
