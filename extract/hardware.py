"""What this CPU computes natively, decided once for training and extraction.

Reduced precision on a CPU only pays where the instruction set has it: with AVX512-BF16 or AMX the
fmnist32 U-Net ran 1.3x faster in bf16 autocast than in float32 (253.8 vs 195.2 images/s, one thread);
float16 autocast on that same CPU, which lacks AVX512-FP16, ran at 5.7 images/s, 34x slower, and bf16
on AVX2-only CPUs is about 35x slower too. So a reduced dtype is used on the CPU only when native.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# /proc/cpuinfo flags (x86) or features (aarch64) that make a dtype's matmuls native.
NATIVE_FLAGS = {
    "bfloat16": ("amx_bf16", "avx512_bf16", "bf16"),
    "float16": ("amx_fp16", "avx512_fp16", "fphp"),
}
SLOWDOWN_WITHOUT = 34  # measured (see the module docstring), for the messages


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    words: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    return frozenset(words)


def cpu_has_native(dtype: str) -> bool:
    """True for float32, and for bfloat16 / float16 where the CPU has instructions for them."""
    if dtype == "float32":
        return True
    return any(flag in cpu_flags() for flag in NATIVE_FLAGS.get(dtype, ()))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "this CPU"
