"""The prepared device check runs in its CPU mode, so the script cannot rot between GPU runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_cpu_quick_mode(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "device_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--budget",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["ok"] is True
    for model in ("adm_tiny", "adm_tiny_alt"):
        assert report["correctness"][model]["float32"]["max_rel_err"] <= 1e-4
    assert report["batch_independence"]["max_abs_diff"] < 1e-4
    arms = [a for a in report["throughput"]["arms"] if "images_per_s" in a]
    assert {a["arm"] for a in arms} == {"features [24]", "features [19,24,30]", "full forward + hook 24"}
    assert all(a["images_per_s"] > 0 for a in arms)
    pipeline = report["pipeline"]
    assert pipeline["noise_and_pixels"]["pixel_scaling_bitwise_equal_to_cpu"] is True
    assert pipeline["stores"]["kill_resume_bitwise_equal"] is True
    assert pipeline["stores"]["batch_size_3_vs_8_bitwise_equal"] is True
    assert pipeline["end_to_end"]["images_per_s"] > 0
    assert pipeline["sweep"]["ok"] is True and pipeline["sweep"]["test_top1"] > 0.5  # 10 classes
