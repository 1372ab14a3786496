"""The prepared device check runs in its CPU mode, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
ARMS = [
    "eager",
    "compile max-autotune-no-cudagraphs",
    "cuda graph (eager capture)",
    "compile reduce-overhead",
    "compile max-autotune-no-cudagraphs + channels_last",
    "full forward + hook 24 (eager)",
]


@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import device_check
    finally:
        sys.path.pop(0)
    return device_check


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((out / "device_check.json").read_text())


@pytest.mark.slow
def test_device_check_cpu_quick_mode(tmp_path):
    _, report = run_check(tmp_path, "--budget", "600")
    assert report["complete"] is True and report["skipped"] == {}
    assert report["ok"] is True
    assert report["checks"] == {"correctness": True, "arms_features_within_tolerance": True, "pipeline": True}
    for model in ("adm_tiny", "adm_tiny_alt"):
        assert report["correctness"][model]["float32"]["max_rel_err"] <= 1e-4
    assert report["batch_independence"]["max_abs_diff"] < 1e-4

    # every arm ran, in the stated order, its setup timed apart from its rate, its features checked
    assert report["peak"]["tflop_per_s"] is None and "no percentages" in report["peak"]["note"]
    arms = report["arms"]
    assert arms["compile_backend"] == "eager" and arms["precision"] == "float32"
    assert [row["arm"] for row in arms["arms"]] == ARMS
    for row in arms["arms"]:
        assert row["setup_seconds"] >= 0 and row["images_per_s"] > 0, row
        assert row["features_ok"] is True and row["max_rel_err"] <= 1e-4, row
        assert "pct_of_peak" not in row  # no known peak on a CPU
        assert row["top_kernels"] and all(k["calls"] > 0 for k in row["top_kernels"])
    assert "cuda graphs need CUDA" in arms["cuda_graph"]
    assert "backend eager, mode max-autotune-no-cudagraphs not applied" in arms["arms"][1]["setup"]
    assert arms["best"]["arm"] in ARMS[:-1] and arms["best"]["speedup_vs_eager"] > 0
    assert arms["early_exit_speedup_eager"] > 0

    table = [a for a in report["throughput"]["arms"] if "images_per_s" in a]
    assert {a["arm"] for a in table} == {"features [24]", "features [19,24,30]", "full forward + hook 24"}
    assert all(a["images_per_s"] > 0 for a in table)
    pipeline = report["pipeline"]
    assert pipeline["noise_and_pixels"]["pixel_scaling_bitwise_equal_to_cpu"] is True
    assert pipeline["stores"]["kill_resume_bitwise_equal"] is True
    assert pipeline["stores"]["batch_size_3_vs_8_bitwise_equal"] is True
    assert pipeline["end_to_end"]["images_per_s"] > 0
    assert pipeline["sweep"]["ok"] is True and pipeline["sweep"]["test_top1"] > 0.5  # 10 classes


def test_an_exhausted_budget_skips_every_section_with_its_reason(tmp_path):
    _, report = run_check(tmp_path, "--budget", "0", "--sections", "correctness,arms,pipeline")
    assert report["complete"] is True and report["ok"] is False
    assert set(report["skipped"]) == {"correctness", "arms", "pipeline"}
    assert all(why.startswith("time budget") for why in report["skipped"].values())
    assert report["checks"] == {"correctness": None, "arms_features_within_tolerance": None, "pipeline": None}


def test_unknown_section_is_refused_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path), "--sections", "arms,speed"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "unknown sections ['speed']" in proc.stderr
    assert not (tmp_path / "device_check.json").exists()


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # the SXM part's name
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA A100-SXM4-80GB", None),
        ("cpu", None),
    ],
)
def test_percentages_use_the_device_data_sheet_peak_or_none(device_check, name, peak):
    record = device_check.bf16_peak(name)
    assert record["device_name"] == name and record["tflop_per_s"] == peak
    row = device_check.rate(100.0, 2_500_000_000_000, "bfloat16", record)  # 100 images x 5 TFLOP = 500 TFLOP/s
    assert row["tflop_per_s"] == 500.0
    if peak:
        assert row["pct_of_peak"] == round(50000 / peak, 1) and row["peak_tflop_per_s"] == peak
    else:
        assert "pct_of_peak" not in row
    assert "pct_of_peak" not in device_check.rate(100.0, 2_500_000_000_000, "float32", record)


def test_budget_refuses_work_that_would_not_fit_and_cuts_work_that_overruns(device_check):
    budget = device_check.Budget(30.0)
    assert budget.refusal(10.0) is None
    assert "needs ~40 s" in budget.refusal(40.0)
    assert "kept for later sections" in budget.refusal(10.0, reserve=25.0)
    short = device_check.Budget(0.2)
    started = time.monotonic()
    with pytest.raises(device_check.OverBudget, match="cut after"), short.cut():
        while time.monotonic() - started < 5:
            pass
    assert time.monotonic() - started < 2
    with pytest.raises(device_check.OverBudget, match="nothing left"), device_check.Budget(0.0).cut():
        pass


def test_captured_forward_feeds_new_inputs_through_its_static_buffers(device_check):
    weight = torch.randn(4, 3)
    captured = device_check.CapturedForward(lambda x, s: x @ weight.T * s, torch.zeros(2, 3), torch.ones(()))
    assert "cuda graphs need CUDA" in captured.record
    x, s = torch.randn(2, 3), torch.tensor(3.0)
    out = captured(x, s)
    torch.testing.assert_close(out, x @ weight.T * 3.0)
    assert torch.equal(captured.inputs[0], x)  # the inputs went through the static buffers
    with pytest.raises(ValueError, match=r"captured at \(2, 3\)"):
        captured(torch.randn(5, 3), s)
    with pytest.raises(ValueError, match="captured with 2 inputs"):
        captured(x)


def test_the_report_is_replaced_whole(device_check, tmp_path):
    path = tmp_path / "device_check.json"
    device_check.write_json(path, {"complete": False})
    device_check.write_json(path, {"complete": True, "arms": [1, 2]})
    assert json.loads(path.read_text()) == {"complete": True, "arms": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["device_check.json"]
