"""benchmarks/fmnist_reproduction.py on slices of Fashion-MNIST: the store path gives the in-memory path's
features bit for bit, the pixels arm is a probe run that `probe compare` pairs with store probes, and the
trained model's features beat its random-init control's by a margin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffbank.demo import fashion_mnist_present
from extract.idx import FASHION_MNIST_DIR
from extract.pipeline import extract
from extract.store import open_store
from probe.compare import compare_runs
from probe.options import LogisticOptions
from probe.run import run_logistic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fmnist_reproduction.py"
LIMIT = {"train": 200, "test": 60}

pytestmark = pytest.mark.skipif(
    not fashion_mnist_present(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """cache_specs/fmnist_full.yaml on the first 200 + 60 images, t=5, blocks 10 and 13."""
    spec = yaml.safe_load((ROOT / "cache_specs" / "fmnist_full.yaml").read_text())
    spec["dataset"]["limit"] = LIMIT
    spec["features"].update(timesteps=[5], blocks=[10, 13], tokens={10: 8, 13: 8})
    spec["storage"]["chunk_rows"] = 64
    url = str(tmp_path_factory.mktemp("repro") / "s.zarr")
    extract(spec, url, progress=False)
    return url


def _load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import fmnist_reproduction
    finally:
        sys.path.pop(0)
    return fmnist_reproduction


def test_store_features_equal_the_in_memory_extraction(store):
    repro = _load_script()
    from extract.diffusion import NoiseSchedule
    from extract.models import fmnist
    from extract.models.adm import ADMUNet
    from extract.models.checkpoints import read_state_dict

    x0, labels, n_train = repro.load_images(FASHION_MNIST_DIR, LIMIT["train"], LIMIT["test"])
    assert n_train == LIMIT["train"]
    model = ADMUNet.from_flags(**fmnist.FLAGS)
    model.load_state_dict(read_state_dict(repro.WEIGHTS / "fmnist32.safetensors"))
    noise = {5: repro.all_noise(len(labels), 5, 1)}
    schedule = NoiseSchedule.from_flags("linear", 1000)
    keys = ([5], [10, 13], ["avg4", "tok8"])
    with torch.random.fork_rng():
        torch.set_num_threads(1)  # the store was written with one thread (extract's default)
        memory = repro.Features(model, x0, noise, schedule, *keys, torch.device("cpu"), batch=64).maps
    cached = repro.StoreFeatures(store, labels, *keys, torch.device("cpu"))
    assert sorted(cached) == sorted(memory)
    for key in memory:
        assert torch.equal(cached[key], memory[key]), key
    with pytest.raises(ValueError, match="labels"):
        repro.StoreFeatures(store, labels[::-1].copy(), *keys, torch.device("cpu"))
    with pytest.raises(ValueError, match="t025_b10_avg4"):
        repro.StoreFeatures(store, labels, [25], [10], ["avg4"], torch.device("cpu"))


def _run(limit_train: int, limit_test: int, *args: str) -> None:
    cmd = [sys.executable, str(SCRIPT), "--limit-train", str(limit_train), "--limit-test", str(limit_test)]
    done = subprocess.run([*cmd, "--threads", "1", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_pixels_run_directory_pairs_with_store_probes(store, tmp_path):
    common = ["--grid-timesteps", "5", "--blocks", "10,13", "--store", f"final={store}"]
    _run(
        LIMIT["train"],
        LIMIT["test"],
        "--out",
        str(tmp_path / "linear"),
        "--stages",
        "pixels,progress",
        "--models",
        "final",
        *common,
    )
    linear = json.loads((tmp_path / "linear" / "reproduction.json").read_text())
    final = linear["progress"][0]
    assert final["model"] == "final" and final["source"] == store
    assert len(final["grid"]) == 2 * 2 * 4  # blocks x pools x L2
    assert all(0 <= row["iterations"] <= 300 for row in final["grid"])
    assert linear["sizes"] == {"fit": 179, "val": 21, "test": LIMIT["test"]}
    assert linear["protocol"].startswith("179 fit / 21 val")

    # the pixels arm as a probe run: `probe compare` pairs it with a store probe by sample id
    pixels = tmp_path / "linear" / "pixels"
    results = json.loads((pixels / "results.json").read_text())
    assert round(100 * results["metrics"]["test"]["top1"], 2) == linear["pixels"]["test"]
    assert results["split_definition"]["splits"]["val"]["n"] == 21
    run_logistic(open_store(store), tmp_path / "probe", LogisticOptions(refit="train", features=["t005_b10_avg4"]))
    report = compare_runs([tmp_path / "probe", pixels])
    pair = report["pairs"][0]
    assert pair["matched_by"] == "sample ids" and pair["n"] == LIMIT["test"]
    assert pair["accuracy_b"] == pytest.approx(results["metrics"]["test"]["top1"])
    # validation rows are the same images too: one split rule for the benchmark and the product
    assert compare_runs([tmp_path / "probe", pixels], split="val")["pairs"][0]["n"] == 21


def test_trained_features_beat_the_random_init_control_by_a_margin(tmp_path):
    """The first 1,000 training (899 fit / 101 val) and 500 test images, t=5, block 10, avg4 and tok8, both
    models extracted in memory; pooling and L2 selected on validation, test scored once per model. Measured:
    trained 87.4 vs random 79.8 (+7.6; per pooling +9.4 avg4, +7.6 tok8). A broken trained model (random-like
    features) would sit within a couple of points of its control; the margin asked is 4 points."""
    out = tmp_path / "margin"
    _run(
        1000,
        500,
        "--out",
        str(out),
        "--stages",
        "progress",
        "--models",
        "random,final",
        "--grid-timesteps",
        "5",
        "--blocks",
        "10",
        "--workers",
        "1",
    )
    result = json.loads((out / "reproduction.json").read_text())
    assert result["sizes"] == {"fit": 899, "val": 101, "test": 500}
    for entry in result["progress"]:  # the selection is validation's argmax, earliest on ties; test only for it
        grid = entry["grid"]
        best = next(row for row in grid if row["val"] == max(r["val"] for r in grid))
        chosen = {k: entry["selected"][k] for k in ("t", "block", "pool", "l2", "val")}
        assert chosen == {k: best[k] for k in chosen} and all("test" not in row for row in grid)
    assert result["summary"]["gain_over_random_points"] >= 4.0, result["summary"]
