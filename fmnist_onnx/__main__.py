from fmnist_onnx.cli import main

main()
