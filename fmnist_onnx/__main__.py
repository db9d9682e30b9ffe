"""``python -m fmnist_onnx`` and the ``fmnist-onnx`` script: Ctrl-C is handled before the first import."""

try:
    from fmnist_onnx.errors import exit_at_once_on_ctrl_c

    exit_at_once_on_ctrl_c()
except KeyboardInterrupt:  # Ctrl-C in the few microseconds before the handler is in place
    import os

    os.write(2, b"Interrupted.\n")
    os._exit(130)


def main() -> None:
    from fmnist_onnx.testing import MAIN_STARTED, pause_point

    pause_point(MAIN_STARTED)  # tests hold the process here: Ctrl-C's handler is in place (testing.py)
    from fmnist_onnx.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
