"""The machine a benchmark ran on, named as a reader needs it: the CPU model and its vector units (AMX,
AVX-512 BF16, AVX2 decide the CPU engines' speed by 3x), not `platform.machine()`'s bare "x86_64"."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX, AVX512-BF16; Linux's flags)."""
    flags = _cpuinfo()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_name() -> str:
    """E.g. 'AMD EPYC 9B45 (AVX-512 BF16), 2 cores'; the model from /proc/cpuinfo where Linux has one."""
    info = _cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else
             "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "")
    return f"{model}{f' ({units})' if units else ''}, {os.cpu_count()} cores"
