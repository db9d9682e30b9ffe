"""Engines that run `classify` somewhere other than this process's worker pool (fmnist_onnx.classify).

Each engine gives the same rows, columns, formats and summary as the local engine, and imports its
framework only when it runs, so that the default install stays free of it:

- ``ray`` (fmnist_onnx.engines.ray): Ray Data on an existing cluster or a local runtime
  (``pip install "fmnist-onnx[ray]"``).
"""

ENGINES = ("local", "ray")
