"""benchmarks/bench_standardise_cast.py: the fused cast arms give the reader's epoch byte for byte, and the
reader's own cast and standardisation are back in place after each arm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from extract.store import decode
from extract.store.memory import cast_into
from probe.stats import FeatureStats

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_standardise_cast.py"


def test_fused_arms_match_the_reader_bit_for_bit(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_standardise_cast as bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    rng = np.random.default_rng(0)
    x16 = (rng.standard_normal((64, 96)) * 40 + 3).astype(np.float16)
    x16[0, :3] = [np.inf, -np.inf, np.nan]
    stats = FeatureStats(
        mean=rng.standard_normal(96).astype(np.float32),
        std=(rng.random(96) + 0.25).astype(np.float32),
        mode="feature",
        rows_digest="",
        count=64,
    )
    expected = np.empty(x16.shape, np.float32)
    cast_into(expected, x16)
    stats.apply(expected)
    apply = FeatureStats.apply
    for arm in bench.ARMS[1:]:
        with bench.arm_in_place(arm, stats.mean):
            got = np.empty(x16.shape, np.float32)
            decode.cast_into(got, x16)
            stats.apply(got)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), arm
        assert decode.cast_into is cast_into and FeatureStats.apply is apply


def test_a_small_run_reports_every_arm(tmp_path):
    out = tmp_path / "cast.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--rows", "3000", "--rounds", "1", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["bytes_identical"] is True and set(result["arms"]) == {"reader", "torch_sub", "numpy_subtract"}
    assert all(len(a["cpu_s"]) == 1 and a["median_cpu_s"] > 0 for a in result["arms"].values())
