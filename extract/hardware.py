"""What this machine computes natively, and what its float bytes depend on.

Reduced precision on a CPU only pays where the instruction set has it: with AVX512-BF16 or AMX the
fmnist32 U-Net ran 1.3x faster in bf16 autocast than in float32 (253.8 vs 195.2 images/s, one thread);
float16 autocast on that same CPU, which lacks AVX512-FP16, ran at 5.7 images/s, 34x slower, and bf16
on AVX2-only CPUs is about 35x slower too. So a reduced dtype is used on the CPU only when native.

float32 features are not bit-identical across instruction sets: oneDNN and the BLAS choose kernels per ISA
and round differently (on the reference store, 9 of 29,952 float16 values moved by one ulp between AVX-512
and AVX2). `machine_signature` records everything that choice depends on, so a store says which machine
kind its bytes belong to.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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


# CPU flags that change which kernels oneDNN and the BLAS run for float32, bf16 and fp16.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "asimd", "sve")
# Environment variables that cap or override those choices (set, they decide the bytes as much as the CPU).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def _library_versions() -> dict[str, str | None]:
    """oneDNN's and the BLAS's versions, as torch's build report states them."""
    import torch  # seconds to import: the store commands describe signatures without it

    text = torch.__config__.show()
    onednn = re.search(r"MKL-DNN v([\w.]+)", text) or re.search(r"oneDNN v([\w.]+)", text)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", text)
    blas = re.search(r"BLAS_INFO=(\w+)", text)
    return {
        "onednn": onednn.group(1) if onednn else None,
        "blas": (blas.group(1) if blas else None) if not mkl else f"mkl {mkl.group(1)}",
    }


def machine_signature(device: torch.device | str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What a float feature's bytes depend on besides the spec: ISA level, kernel libraries, threads, GPU.

    Two runs whose signatures agree on everything but `cpu` (the model name, kept for people) write the
    same bytes for the same spec; `same_kernels` says whether two signatures agree.
    """
    import torch  # seconds to import: the store commands describe signatures without it

    device = torch.device(device)
    signature: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(f for f in KERNEL_FLAGS if f in cpu_flags()),
        "torch": torch.__version__,
        **_library_versions(),
        "threads": int(threads if threads is not None else torch.get_num_threads()),
        "device": device.type,
    }
    env = {k: os.environ[k] for k in KERNEL_ENV if os.environ.get(k)}
    if env:
        signature["kernel_env"] = env
    if device.type == "cuda":
        signature["device_name"] = torch.cuda.get_device_name(device)
        signature["cuda"] = torch.version.cuda
        signature["cudnn"] = torch.backends.cudnn.version()
    return signature


def same_kernels(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """True when two signatures run the same kernels (the CPU's marketing name aside)."""
    if not a or not b:
        return False
    return {k: v for k, v in a.items() if k != "cpu"} == {k: v for k, v in b.items() if k != "cpu"}


def describe_signature(signature: dict[str, Any] | None) -> str:
    """One line for people: 'AVX512 (Intel Xeon ...), torch 2.13.0, oneDNN 3.12.0, mkl 2024.2, 1 thread'."""
    if not signature:
        return "unrecorded"
    where = signature.get("device_name") or signature.get("cpu") or "?"
    parts = [f"{signature.get('cpu_capability')} ({where})", f"torch {signature.get('torch')}"]
    if signature.get("onednn"):
        parts.append(f"oneDNN {signature['onednn']}")
    if signature.get("blas"):
        parts.append(str(signature["blas"]))
    if signature.get("cuda"):
        parts.append(f"CUDA {signature['cuda']}, cuDNN {signature.get('cudnn')}")
    parts.append(f"{signature.get('threads')} thread(s)")
    if signature.get("kernel_env"):
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(signature["kernel_env"].items())))
    return ", ".join(parts)


def main() -> None:
    """`python -m extract.hardware`: this machine's signature, as CI prints it at its start."""
    signature = machine_signature("cpu", threads=1)
    print(f"machine: {describe_signature(signature)}; flags: {' '.join(signature['cpu_flags']) or 'none'}")


if __name__ == "__main__":
    main()
