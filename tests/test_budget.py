"""Memory budgets as users write them."""

from __future__ import annotations

import pytest

from probe.budget import default_memory_budget, parse_memory
from probe.errors import ProbeDataError


def test_memory_budget_strings():
    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("500MB") == 500 * 10**6 and parse_memory(4096) == 4096
    assert parse_memory("25%") == default_memory_budget(0.25) and parse_memory(None) == default_memory_budget()
    for bad in ("", "lots", "-1GB"):
        with pytest.raises(ProbeDataError, match="not understood"):
            parse_memory(bad)
    with pytest.raises(ProbeDataError, match=">= 0"):
        parse_memory(-1)


def test_byte_sizes_read_as_dask_reads_them():
    assert parse_memory("1e9") == 10**9 and parse_memory("MB") == 10**6 and parse_memory("3 KiB") == 3 * 1024
    with pytest.raises(ProbeDataError, match="not understood"):
        parse_memory("3 apples")
