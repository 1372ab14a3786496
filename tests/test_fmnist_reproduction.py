"""benchmarks/fmnist_reproduction.py on a slice of Fashion-MNIST: the store path gives the in-memory path's
features bit for bit, and the staged runs (linear grid, heads, merged paired tests) work end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffbank.demo import fashion_mnist_present
from extract.idx import FASHION_MNIST_DIR
from extract.pipeline import extract

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


def _run(*args: str) -> None:
    cmd = [sys.executable, str(SCRIPT), "--limit-train", "200", "--limit-test", "60", "--threads", "1", *args]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)


def test_staged_runs_merge_into_paired_tests(store, tmp_path):
    common = ["--grid-timesteps", "5", "--blocks", "10,13", "--store", f"final={store}"]
    _run("--out", str(tmp_path / "linear"), "--stages", "pixels,progress", "--models", "final", *common)
    heads = ["--head-dim", "32", "--head-heads", "2", "--head-depth", "1", "--head-epochs", "2", "--head-seeds", "0"]
    _run("--out", str(tmp_path / "heads"), "--stages", "heads", "--attention-input", "5,10,tok8", *common, *heads)
    linear = json.loads((tmp_path / "linear" / "reproduction.json").read_text())
    final = linear["progress"][0]
    assert final["model"] == "final" and final["source"] == store
    assert len(final["grid"]) == 2 * 2 * 4  # blocks x pools x L2
    assert all(0 <= row["iterations"] <= 300 for row in final["grid"])
    assert 0 <= final["selected"]["test"] <= 100

    # a rerun of the heads stage resumes from its checkpoints instead of training again
    before = (tmp_path / "heads" / "reproduction.json").read_text()
    _run("--out", str(tmp_path / "heads"), "--stages", "heads", "--attention-input", "5,10,tok8", *common, *heads)
    again = json.loads((tmp_path / "heads" / "reproduction.json").read_text())
    assert [h["test"] for h in again["heads"]] == [h["test"] for h in json.loads(before)["heads"]]

    _run(
        "--out",
        str(tmp_path),
        "--stages",
        "tests",
        "--merge",
        str(tmp_path / "linear"),
        "--merge",
        str(tmp_path / "heads"),
    )
    merged = json.loads((tmp_path / "reproduction.json").read_text())
    assert set(merged["tests"]) == {
        "final_vs_pixels",
        "attention0_vs_linear",
        "fusion0_vs_attention0",
        "fusion0_vs_linear",
    }
    with np.load(tmp_path / "test_correct.npz") as z:
        correct = {k: z[k] for k in z.files}
    a, b = correct["attention0"], correct["final"]
    assert merged["tests"]["attention0_vs_linear"]["only_a"] == int(np.sum(a & ~b))
    assert len(a) == LIMIT["test"]
