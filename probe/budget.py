"""Memory budgets as users write them: bytes, "2GiB", "500MB", "25%" (of physical RAM), or None (25%)."""

from __future__ import annotations

import os

from probe.errors import ProbeDataError

__all__ = ["default_memory_budget", "parse_bytes", "parse_memory"]


def default_memory_budget(fraction: float = 0.25) -> int:
    """`fraction` of physical RAM in bytes (4 GiB when the platform cannot tell)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(total * fraction)


# Units of `parse_bytes`, as dask.utils.parse_bytes reads them (case-insensitive; "k"/"ki" = kB/KiB, ...).
_BYTE_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}
_BYTE_UNITS.update({k[0] + "ib": 2 ** (10 * (i + 1)) for i, k in enumerate(_BYTE_UNITS)})
_BYTE_UNITS.update({k[0]: v for k, v in list(_BYTE_UNITS.items()) if "i" not in k})
_BYTE_UNITS.update({k[:-1]: v for k, v in list(_BYTE_UNITS.items()) if "i" in k})
_BYTE_UNITS.update({"b": 1, "": 1})


def parse_bytes(text: str) -> int:
    """Bytes from "2GiB", "500 MB", "1e9", "MB" (= 1 MB): dask.utils.parse_bytes's rules, without importing dask."""
    s = text.replace(" ", "")
    if not any(c.isdigit() for c in s):
        s = "1" + s
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    try:
        return int(float(s[:i]) * _BYTE_UNITS[s[i:].lower()])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"could not interpret {text!r} as a byte size") from exc


def parse_memory(value: int | float | str | None) -> int:
    """Bytes from `None` (default budget), a number of bytes, or a string like `"2GiB"`, `"500MB"`, `"25%"`."""
    if value is None:
        return default_memory_budget()
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = -1.0
            if not 0 <= percent <= 100:
                raise ProbeDataError(f"memory budget {value!r}: the percentage of RAM must be in [0, 100]")
            return default_memory_budget(percent / 100.0)
        try:
            size = parse_bytes(text) if text else -1
        except ValueError:
            size = -1
        if size < 0:
            raise ProbeDataError(f"memory budget {value!r} is not understood: use bytes, '2GiB', '500MB' or '25%'")
        return int(size)
    if value < 0:
        raise ProbeDataError(f"memory budget must be >= 0 bytes, got {value}")
    return int(value)
