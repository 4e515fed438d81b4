"""Export of trained bundles to ONNX and TensorRT."""
