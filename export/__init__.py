"""Export of trained bundles to ONNX and TensorRT."""

__all__ = ["onnx", "tensorrt"]
