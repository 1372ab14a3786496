"""extract/hardware.py: which dtypes this CPU computes natively."""

from __future__ import annotations

import extract.hardware as hardware


def test_native_dtypes_follow_the_cpu_flags(monkeypatch):
    cases = {
        frozenset({"avx2", "fma"}): (True, False, False),
        frozenset({"avx2", "avx512f", "avx512_bf16"}): (True, True, False),
        frozenset({"amx_bf16", "amx_fp16"}): (True, True, True),
        frozenset({"fp", "asimd", "bf16", "fphp"}): (True, True, True),  # aarch64 features
        frozenset(): (True, False, False),
    }
    for flags, expected in cases.items():
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert tuple(hardware.cpu_has_native(d) for d in ("float32", "bfloat16", "float16")) == expected, flags


def test_this_machine_is_described():
    assert hardware.cpu_name()
    assert isinstance(hardware.cpu_flags(), frozenset)
