"""CUDA sources of the fused kernels (nearest neighbour, Mahalanobis), compiled on the box by ../fused_*.py."""
