"""benchmarks/bench_scale.py --quick: every operation runs in its own process and reports its time and memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def test_quick_run_measures_every_operation(tmp_path):
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    out = tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1"}
    ops = "write,info,verify,read,epoch"
    sizes = "rows_2000,width_18"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--sizes",
        sizes,
        "--ops",
        ops,
        "--json",
        str(out),
        "--dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert results["quick"] is True
    rows, width = results["sizes"]["rows_2000"], results["sizes"]["width_18"]
    assert (rows["rows"], rows["features"], width["features"]) == (2000, 1, 18)
    assert "s3" not in rows
    measured = [rows["local"], width["local"], {k: v for k, v in width["s3"].items() if k != "upload"}]
    for where in measured:
        for op, r in where.items():
            assert "error" not in r, (op, r)
            assert r["seconds"] > 0 and r["peak_rss_mb"] > 0, (op, r)
    assert set(rows["local"]) == set(ops.split(","))
    assert "epoch" not in width["local"]  # a question of rows
    epoch = rows["local"]["epoch"]  # the streamed epoch beside np.load of the same data, in the same rounds
    assert set(epoch["arms"]) == {"np.load", "np.load windows", "epoch"}
    assert epoch["percent_of_np_load"] > 0 and epoch["percent_of_np_load_windows"] > 0
    assert all(len(a["seconds"]) == epoch["rounds"] for a in epoch["arms"].values())
    assert set(width["s3"]) == {"upload", "info", "verify", "read"}
    assert all(r["requests"] > 0 for r in width["s3"].values())
    assert "us/row" in done.stdout and "ms/f" in done.stdout  # the side-by-side table
    assert not list(tmp_path.glob("bench_scale_*"))  # stores removed once measured
