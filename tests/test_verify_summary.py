"""`store verify` says what it checked (arrays, units, rows, bytes) and what `--full` would add."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from diffbank.cli import main
from extract.store import save_features, verify

N, SHARD = 24, 8


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "s.zarr"
    save_features(
        path,
        {
            "t090_b24_avg2": rng.standard_normal((N, 8, 2, 2)).astype(np.float16),
            "t010_b02_avg1": rng.random((N, 3, 1, 1)),
        },
        rng.integers(0, 3, N),
        {"train": np.arange(16), "test": np.arange(16, N)},
        shard_rows=SHARD,
        chunk_rows=4,
    )
    return path


def test_report_counts_what_it_checked(store):
    report = verify(store)
    feature_bytes = N * 8 * 2 * 2 * 2 + N * 3 * 4  # float16 and float32 features
    assert report.checked["features"] == 2 and report.checked["units"] == N // SHARD
    assert report.checked["rows"] == N and report.checked["bytes"] == feature_bytes
    assert report.checked["arrays"] > 2  # the sample arrays (label, id, valid, error, ...) too
    text = str(report)
    assert "checked: 2 feature arrays" in text and f"3 units of {N} rows" in text
    assert "--full would also read" in text and "checksums" in text


def test_full_scan_says_what_it_read(store):
    text = str(verify(store, full_scan=True))
    assert "read: " in text and "every shard and chunk" in text and "--full would" not in text


def test_cli_prints_the_summary(store):
    result = CliRunner().invoke(main, ["store", "verify", str(store)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "checked: 2 feature arrays" in result.output
    assert "--full would also read" in result.output
