"""Deployment: export to ONNX / TensorRT / Triton (``ppfr.deploy.export``), one runner API over eager PyTorch,
ONNX Runtime and TensorRT (``ppfr.deploy.runner``), and serving (``ppfr.deploy.serve`` / ``client``).

Nothing is imported eagerly: onnx, onnxruntime and tensorrt are optional and load only when used.
"""
