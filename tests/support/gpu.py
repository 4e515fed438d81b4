"""Whether the GPU tests can run here."""

from __future__ import annotations


def _cuda_missing() -> str | None:
    """Why the GPU tests cannot run here (no pycuda, or no GPU), or None where they can."""
    try:
        import pycuda.autoinit  # noqa: F401
    except Exception as exc:  # ImportError, or a driver error without a GPU
        return f"no CUDA GPU through pycuda ({type(exc).__name__})"
    return None


CUDA_MISSING = _cuda_missing()
