"""benchmarks/reproduce_fmnist.py end to end on the first 200 + 60 Fashion-MNIST images: both stores extracted
by `diffbank extract`, the pixels arm as a probe run, the logistic selection on validation, both heads, the
named `probe compare` pairs and the collected JSON; a rerun skips every finished step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffbank.demo import fashion_mnist_present
from extract.idx import FASHION_MNIST_DIR
from probe.logits import read_logits

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce_fmnist.py"
LIMIT = {"train": 200, "test": 60}
FEATURES = ["t005_b10_avg4", "t005_b10_tok8"]

pytestmark = pytest.mark.skipif(
    not fashion_mnist_present(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed"
)


def _tiny_spec(source: str, target: Path) -> Path:
    """A shipped spec on the first 200 + 60 images, t=5, block 10 only."""
    spec = yaml.safe_load((ROOT / "cache_specs" / source).read_text())
    spec["dataset"]["limit"] = LIMIT
    spec["features"].update(timesteps=[5], blocks=[10], tokens={10: 8})
    spec["storage"]["chunk_rows"] = 64
    target.write_text(yaml.safe_dump(spec))
    return target


def _run(tmp_path: Path, *extra: str) -> str:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(tmp_path / "out"),
        "--stores",
        str(tmp_path / "stores"),
        "--trained-spec",
        str(_tiny_spec("fmnist_full.yaml", tmp_path / "trained.yaml")),
        "--random-spec",
        str(_tiny_spec("fmnist_full_random.yaml", tmp_path / "random.yaml")),
        "--threads",
        "1",
        "--features",
        ",".join(FEATURES),
        "--seeds",
        "0",
        "--fusion-feature",
        "t005_b10_avg4",
        "--pixels-args",
        f"--limit-train {LIMIT['train']} --limit-test {LIMIT['test']}",
        "--logistic-args",
        "--l2 1e-2 --l2 1e-3 --max-iter 30",
        "--attention-args",
        "--preset tiny --epochs 1",
        "--fusion-args",
        "--preset tiny --epochs 1",
        "--results",
        str(tmp_path / "reproduction_product.json"),
        *extra,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_reproduction_runs_through_diffbank_commands_and_collects_one_json(tmp_path):
    log = _run(tmp_path)
    collected = json.loads((tmp_path / "reproduction_product.json").read_text())
    steps = {f.stem: json.loads(f.read_text()) for f in (tmp_path / "out" / "steps").glob("*.json")}
    assert all(s["returncode"] == 0 for s in steps.values())
    assert steps["extract__trained"]["command"].startswith("diffbank extract ")
    assert steps["pixels"]["command"].startswith("python benchmarks/fmnist_reproduction.py --stages pixels")

    for store in ("trained", "random"):
        linear = collected["linear"][store]
        runs = linear["runs"]
        assert list(runs) == FEATURES
        best = max(runs[f]["val_top1"] for f in FEATURES)
        assert linear["selected_feature"] == next(f for f in FEATURES if runs[f]["val_top1"] == best)
        assert linear["test_top1_of_selected"] == runs[linear["selected_feature"]]["test_top1"]
        for f, run in runs.items():
            assert f"--feature {f}" in run["command_line"] and "--refit train" in run["command_line"]
            assert run["protocol"]["sizes"] == {"train": 179, "val": 21, "test": LIMIT["test"]}
            assert run["protocol"]["selected_on_val"] == "L2"
            assert [fit["l2"] for fit in run["fits"]] == [1e-2, 1e-3]
            assert all(fit["iterations"] > 0 and fit["loss"] > 0 for fit in run["fits"])
            assert run["wall_seconds"] > 0

    pixels = collected["pixels"]
    assert pixels["protocol"]["sizes"] == {"train": 179, "val": 21, "test": LIMIT["test"]}
    assert "179 fit / 21 val" in pixels["protocol"]["text"]
    scores, _ = read_logits(tmp_path / "out" / "pixels" / "logits.npz")
    assert list(scores["test"].ids) == [f"test/{i}" for i in range(LIMIT["test"])]
    assert scores["test"].correct.mean() == pytest.approx(pixels["test_top1"])

    assert set(collected["heads"]) == {"attention_s0", "fusion_s0"}
    attention = collected["heads"]["attention_s0"]
    assert attention["features"] == ["t005_b10_tok8"]
    assert "--preset tiny --epochs 1" in attention["command_line"]

    compare = collected["compare"]
    expected = {
        "trained_vs_random",
        "trained_vs_pixels",
        "random_vs_pixels",
        "attention_s0_vs_linear",
        "fusion_s0_vs_linear",
        "fusion_s0_vs_attention_s0",
    }
    assert expected <= set(compare)
    pixels_pair = compare["trained_vs_pixels"]["pairs"][0]
    assert pixels_pair["matched_by"] == "sample ids" and pixels_pair["n"] == LIMIT["test"]
    assert pixels_pair["accuracy_b"] == pytest.approx(pixels["test_top1"])
    trained = collected["linear"]["trained"]
    assert pixels_pair["accuracy_a"] == pytest.approx(trained["test_top1_of_selected"])
    pair = compare["trained_vs_random"]["pairs"][0]
    assert pair["both_correct"] + pair["only_a"] + pair["only_b"] + pair["both_wrong"] == LIMIT["test"]
    assert 0 <= pair["mcnemar_p"] <= 1 and np.isfinite(pair["difference"])

    # every step finished: a rerun runs nothing (extraction resumes to "nothing to do"; the rest is skipped)
    again = _run(tmp_path, "--stages", "pixels,logistic,heads,compare,collect")
    assert "run  " not in again and again.count("skip ") == len(steps) - 2
    assert log.count("run  ") == len(steps)
