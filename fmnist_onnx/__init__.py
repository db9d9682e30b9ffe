"""fmnist-onnx: from the PyTorch quickstart MLP to a verified, fast ONNX deployment."""

__version__ = "0.1.0"
