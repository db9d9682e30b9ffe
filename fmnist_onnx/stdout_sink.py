"""``-o -``: the prediction table as CSV on stdout, without a journal (table.py encodes the rows)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence

from fmnist_onnx.errors import UserError
from fmnist_onnx.files import OutputError, why
from fmnist_onnx.table import Row, csv_header, encode


class StdoutSink:
    """CSV on stdout, flushed chunk by chunk (``-o -``): no journal, no resume. A reader that goes away
    (``| head``) raises BrokenPipeError, which the CLI ends quietly; any other write error (``> /dev/full``) is
    an OutputError."""

    encoding = "csv"

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        if sys.stdout is None:  # started with stdout closed (>&-)
            raise UserError("stdout is closed: write the table to a file with -o")
        self.out = sys.stdout.buffer
        self._put(csv_header(top_k), flush=False)

    def write(self, rows: Sequence[Row]) -> None:
        self.write_encoded(encode(rows, "csv", self.top_k))

    def write_encoded(self, data: bytes) -> None:
        self._put(data)

    def _put(self, data: bytes, flush: bool = True) -> None:
        try:
            self.out.write(data)
            if flush:
                self.out.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            self._discard()
            raise OutputError(f"cannot write to stdout: {why(e)}. Stdout keeps no journal: write to a file "
                              "(-o preds.csv) to keep the rows and be able to --resume") from None

    def _discard(self) -> None:
        """Rows still buffered would fail again when Python flushes stdout at exit (a second message, and
        exit 120): send them to /dev/null instead."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def finish(self) -> str:
        self._put(b"")
        return "-"

    def close(self) -> None:
        try:
            self.out.flush()
        except (BrokenPipeError, ValueError):  # the reader went away (the CLI says nothing), or closed already
            pass
        except OSError:
            self._discard()
