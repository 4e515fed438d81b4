"""CUDA source of the fused scoring kernel (compiled on the target by runtime.engines.fused_scoring)."""
