"""Memory budgets as users write them: bytes, "2GiB", "500MB", "25%" (of physical RAM), or None (25%)."""

from __future__ import annotations

import os

from dask.utils import parse_bytes

from probe.errors import ProbeDataError

__all__ = ["default_memory_budget", "parse_memory"]


def default_memory_budget(fraction: float = 0.25) -> int:
    """`fraction` of physical RAM in bytes (4 GiB when the platform cannot tell)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(total * fraction)


def parse_memory(value: int | float | str | None) -> int:
    """Bytes from `None` (default budget), a number of bytes, or a string like `"2GiB"`, `"500MB"`, `"25%"`.

    Sizes are read by `dask.utils.parse_bytes` ("2GiB", "500 MB", "1e9"); an empty, unreadable or negative
    size is a `ProbeDataError` that says what is understood.
    """
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
            # dask reads "" as 1 byte; a budget must name its size.
            size = parse_bytes(text) if text else -1
        except ValueError:
            size = -1
        if size < 0:
            raise ProbeDataError(f"memory budget {value!r} is not understood: use bytes, '2GiB', '500MB' or '25%'")
        return int(size)
    if value < 0:
        raise ProbeDataError(f"memory budget must be >= 0 bytes, got {value}")
    return int(value)
