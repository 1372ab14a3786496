"""The extraction loop: determinism, resume after SIGKILL, corrupt images, extension, dask workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from faults.conftest import (  # one definition of "the same store bytes"
    arrays,
    assert_same_arrays,
    kill_after_first_unit,
)
from PIL import Image

from extract.diffusion import seeded_noise
from extract.models.config import TINY_FLAGS
from extract.pipeline import ExtractionError, extract
from extract.store import FingerprintMismatch, open_store

TINY = TINY_FLAGS
N_PER_CLASS = 7


def _images(root: Path, bad: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(N_PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if bad:
        (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _spec(path: Path, **over) -> dict:
    spec = {
        "model": {"flags": dict(TINY)},
        "dataset": {"kind": "folder", "path": str(path)},
        "features": {"timesteps": [10, 50], "blocks": [2, 4], "pooling": [1, 2], "tokens": 4},
        "noise": {"seed": 3, "draws": 2},
        "views": {"center": True, "hflip": True},
        "storage": {"shard_rows": 4, "chunk_rows": 2},
        "compute": {"batch_size": 3},
    }
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("imgs"))


def test_noise_is_per_sample():
    whole = seeded_noise(0, list(range(8)), 50, 0, (3, 4, 4))
    part = seeded_noise(0, [5, 2], 50, 0, (3, 4, 4))
    assert torch.equal(whole[[5, 2]], part)
    assert not torch.equal(seeded_noise(0, [5], 50, 1, (3, 4, 4))[0], whole[5])


def test_batch_size_3_vs_8_identical(images, tmp_path):
    s3 = extract(_spec(images), tmp_path / "b3.zarr", progress=False, batch_size=3)
    s8 = extract(_spec(images), tmp_path / "b8.zarr", progress=False, batch_size=8, num_workers=3)
    assert s3["fingerprint"] == s8["fingerprint"] and s3["complete"] and s8["complete"]
    assert_same_arrays(arrays(tmp_path / "b3.zarr"), arrays(tmp_path / "b8.zarr"))
    fs = open_store(tmp_path / "b3.zarr")
    assert len(fs.feature_names()) == 12 and len(fs.feature_names("flip")) == 12
    assert fs.read("t010_b02_avg1").std() > 0
    # flip features differ from the centre ones: the view is real
    assert not np.array_equal(fs.read("t010_b02_tok4"), fs.read("t010_b02_tok4_flip"))


def test_counter_noise_rule_is_batch_independent_and_recorded(images, tmp_path):
    spec = _spec(images, noise={"rule": "counter", "draws": 1}, views={"hflip": False})
    s3 = extract(spec, tmp_path / "c3.zarr", progress=False, batch_size=3, micro_batch=3)
    extract(spec, tmp_path / "c8.zarr", progress=False, batch_size=8, micro_batch=3)
    assert_same_arrays(arrays(tmp_path / "c3.zarr"), arrays(tmp_path / "c8.zarr"))
    generator = extract(_spec(images, noise={"draws": 1}, views={"hflip": False}), tmp_path / "g.zarr", progress=False)
    assert s3["fingerprint"] != generator["fingerprint"]  # the rule decides the bytes, so it is in the spec
    counter, plain = open_store(tmp_path / "c3.zarr"), open_store(tmp_path / "g.zarr")
    assert "splitmix64" in counter.attrs["provenance"]["noise_seed_rule"]
    assert "torch.Generator" in plain.attrs["provenance"]["noise_seed_rule"]
    assert not np.array_equal(counter.read("t010_b02_avg1"), plain.read("t010_b02_avg1"))


def test_channels_last_is_a_content_option_close_to_the_default(images, tmp_path):
    plain = extract(_spec(images, views={"hflip": False}), tmp_path / "p.zarr", progress=False)
    nhwc = extract(_spec(images, views={"hflip": False}, compute={"channels_last": True}), tmp_path / "c.zarr", progress=False)
    assert nhwc["fingerprint"] != plain["fingerprint"] and nhwc["compile_seconds"] == 0.0
    a, b = open_store(tmp_path / "p.zarr"), open_store(tmp_path / "c.zarr")
    assert b.attrs["spec"]["compute"]["channels_last"] is True and "channels_last" not in a.attrs["spec"]["compute"]
    for name in a.feature_names():
        np.testing.assert_allclose(a.read(name), b.read(name), rtol=2e-3, atol=2e-3)


def test_units_in_any_order_give_the_same_bytes(images, tmp_path):
    extract(_spec(images), tmp_path / "all.zarr", progress=False)
    part = tmp_path / "parts.zarr"
    first = extract(_spec(images), part, progress=False, units=[3, 1], finalize=False)
    assert first["units_computed"] == [1, 3] and not first["complete"]
    second = extract(_spec(images), part, progress=False)
    assert second["units_computed"] == [0, 2] and second["units_already_done"] == [1, 3]
    assert_same_arrays(arrays(tmp_path / "all.zarr"), arrays(part))


def test_threads_are_recorded_and_kept_on_resume(images, tmp_path, monkeypatch, caplog):
    """The thread count decides bytes, so a store keeps the one it started with; the caller's is restored."""
    import extract.pipeline as pipeline

    seen = []
    real = pipeline._run_units
    monkeypatch.setattr(
        pipeline, "_run_units", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1]
    )
    before = torch.get_num_threads()
    path = tmp_path / "t.zarr"
    first = extract(_spec(images), path, progress=False, threads=2, units=[0], finalize=False)
    assert first["threads"] == 2 and torch.get_num_threads() == before
    assert open_store(path).attrs["provenance"]["compute"]["threads"] == 2
    second = extract(_spec(images), path, progress=False, threads=1)
    assert seen == [2, 2] and second["threads"] == 2 and second["units_computed"] == [1, 2, 3]
    assert "started with 2 torch thread(s)" in caplog.text
    default = extract(_spec(images), tmp_path / "d.zarr", progress=False)
    assert seen[-1] == 1 and default["threads"] == 1


def test_reduced_precision_without_cpu_support_is_refused_before_any_work(images, tmp_path, monkeypatch):
    import extract.prepare as preparation

    monkeypatch.setattr(preparation, "cpu_has_native", lambda dtype: dtype == "float32")
    store = tmp_path / "bf16.zarr"
    with pytest.raises(ExtractionError, match=r"compute.dtype bfloat16 on .* no AMX_BF16 / AVX512_BF16.*34x slower"):
        extract(_spec(images, compute={"dtype": "bfloat16"}), store, progress=False, device="cpu")
    assert not store.exists()
    monkeypatch.setattr(preparation, "cpu_has_native", lambda dtype: True)
    done = extract(_spec(images, compute={"dtype": "bfloat16"}, views={"hflip": False}), store, progress=False)
    assert done["complete"]
    # The autocast's error against float32, per feature, on a calibration batch, is in the provenance.
    calibration = open_store(store).attrs["provenance"]["compute"]["calibration"]
    assert calibration["rows"] == 14 and calibration["dtype"] == "bfloat16"
    assert set(calibration["features"]) == set(open_store(store).feature_names())
    for err in calibration["features"].values():
        assert 0 < err["rms_rel_err"] <= err["max_rel_err"] < 0.1


def test_corrupt_image_recorded_or_strict(tmp_path):
    root = _images(tmp_path / "imgs", bad=True)
    summary = extract(_spec(root), tmp_path / "c.zarr", progress=False)
    fs = open_store(tmp_path / "c.zarr")
    bad = int(np.flatnonzero(fs.sample_ids == "dog/bad.png")[0])
    assert [f["id"] for f in fs.failures] == ["dog/bad.png"] and fs.failures[0]["index"] == bad
    assert "bad.png" in summary["failures"][0]["id"]
    assert not fs.valid[bad] and fs.valid.sum() == fs.num_samples - 1
    assert np.all(fs.read("t050_b04_avg2", [bad]) == 0)
    assert bad not in np.concatenate(list(fs.splits.values()))
    assert fs.is_complete()

    with pytest.raises(ExtractionError, match="bad.png"):
        extract(_spec(root), tmp_path / "strict.zarr", progress=False, strict=True)
    strict = open_store(tmp_path / "strict.zarr")
    unit = bad // strict.shard_rows
    status = strict.unit_status()
    assert not any(done[unit] for done in status.values())  # nothing of the failing unit is marked
    assert all(done[:unit].all() for done in status.values())  # earlier finished units were kept


def test_a_store_continued_on_another_machine_kind_warns_and_records_both(images, tmp_path, monkeypatch, caplog):
    from extract.store.tools import info

    url = tmp_path / "two.zarr"
    base = _spec(images, features={"timesteps": [10]}, views={"hflip": False}, noise={"draws": 1})
    from extract.hardware import KERNEL_ENV

    for name in KERNEL_ENV:  # whatever this machine sets, the two runs differ by the one cap below
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # capped kernels: another machine kind
    extract(base, url, progress=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    caplog.set_level("WARNING", logger="extract.prepare")
    grown = _spec(images, features={"timesteps": [10, 50]}, views={"hflip": False}, noise={"draws": 1})
    extract(grown, url, progress=False)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "was started on" in warning and "ONEDNN_MAX_CPU_ISA=AVX2" in warning, warning
    fs = open_store(url)
    assert fs.is_complete()
    units = fs.unit_machines()
    assert units is not None and all(len(signatures) == 2 for signatures in units)
    machines = info(fs)["machines"]
    assert [m["signature"].get("kernel_env") for m in machines] == [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, None]
    assert all(m["units"] == list(range(fs.num_units)) for m in machines)


def test_only_adds_extension_and_refusal(images, tmp_path):
    url = tmp_path / "ext.zarr"
    base = _spec(images, features={"timesteps": [10]}, views={"hflip": False}, noise={"draws": 1})
    extract(base, url, progress=False)
    before = arrays(url)
    grown = _spec(images, features={"timesteps": [10, 50]}, views={"hflip": False}, noise={"draws": 1})
    summary = extract(grown, url, progress=False)
    # only t=50 ran: one forward per micro-batch (4 units x 1 micro-batch), none for t=10
    assert summary["forwards"] == 4
    after = arrays(url)
    for key, value in before.items():
        if key.startswith("features/"):
            assert after[key].tobytes() == value.tobytes(), key
    fs = open_store(url)
    assert fs.is_complete() and "t050_b04_avg2" in fs.feature_names()
    ref = tmp_path / "ref.zarr"
    extract(grown, ref, progress=False)
    for name in fs.feature_names():
        assert fs.read(name).tobytes() == open_store(ref).read(name).tobytes(), name
    with pytest.raises(FingerprintMismatch, match="different spec"):
        extract(
            _spec(images, features={"timesteps": [10, 50]}, views={"hflip": False}, noise={"seed": 9, "draws": 1}),
            url,
            progress=False,
        )


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from diffbank.cli import main; main()", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, text=True)


@pytest.mark.slow
def test_resume_after_sigkill(images, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(images, views={"hflip": False})))
    killed, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    proc = _cli(
        ["extract", str(spec_path), "--store", str(killed), "--no-progress", "--json"],
        env={"DIFFBANK_DEBUG_UNIT_DELAY": "0.8"},
    )
    kill_after_first_unit(proc, killed)
    done = np.asarray(zarr.open_group(str(killed), mode="r", use_consolidated=False)["_progress/done"][:]).all(axis=1)
    assert done[0] and not done.all()
    resumed = _cli(["extract", str(spec_path), "--store", str(killed), "--no-progress", "--json"])
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    summary = json.loads(out)
    assert summary["units_computed"] == np.flatnonzero(~done).tolist()  # finished units were not recomputed
    assert summary["units_already_done"] == np.flatnonzero(done).tolist()
    extract(_spec(images, views={"hflip": False}), whole, progress=False)
    assert_same_arrays(arrays(killed), arrays(whole))


@pytest.mark.slow
def test_dask_two_workers_equal_one(images, tmp_path):
    from extract.cluster import extract_distributed, plan_ranges

    assert plan_ranges([5, 1, 2, 3], 2, tasks_per_worker=1) == [[1, 2], [3, 5]]
    spec = _spec(images, views={"hflip": False}, noise={"draws": 1}, features={"timesteps": [10], "blocks": [2]})
    one = extract(spec, tmp_path / "one.zarr", progress=False)
    two = extract_distributed(spec, tmp_path / "two.zarr", workers=2, progress=False)
    assert two["complete"] and two["units_computed"] == one["units_computed"]
    assert_same_arrays(arrays(tmp_path / "one.zarr"), arrays(tmp_path / "two.zarr"))
    assert open_store(tmp_path / "two.zarr").attrs["consolidated"] is True


def _chunk_files(array_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(array_dir)): p.read_bytes() for p in sorted((array_dir / "c").rglob("*")) if p.is_file()}


def test_separate_draws_are_k_arrays_and_draw_0_is_the_one_draw_store(images, tmp_path):
    """combine: separate keeps each draw: K different arrays, and draw 0's chunks are byte for byte the chunks of
    a one-draw store with the same seed (so a K-draw store extends a one-draw experiment, never replaces it)."""
    grid = {"features": {"timesteps": [50], "blocks": [4], "pooling": [2], "tokens": 4}}
    one = extract(_spec(images, noise={"draws": 1}, **grid), tmp_path / "one.zarr", progress=False)
    sep = extract(
        _spec(images, noise={"draws": 3, "combine": "separate"}, **grid), tmp_path / "k3.zarr", progress=False
    )
    assert one["complete"] and sep["complete"] and one["fingerprint"] != sep["fingerprint"]
    fs = open_store(tmp_path / "k3.zarr")
    names = fs.feature_names(view=None)
    assert names == open_store(tmp_path / "one.zarr").feature_names(view=None)  # draws >= 1 are not features
    for name in names:
        draws = fs.draw_names(name)
        assert draws == [name, f"{name}_d1", f"{name}_d2"]
        assert [fs.feature_info(d).draw for d in draws] == [0, 1, 2]
        values = [fs.read(d) for d in draws]
        for a in range(3):
            for b in range(a + 1, 3):
                assert not np.array_equal(values[a], values[b]), (name, a, b)
        assert _chunk_files(tmp_path / "k3.zarr" / "features" / name) == _chunk_files(
            tmp_path / "one.zarr" / "features" / name
        )
    assert fs.attrs["provenance"]["noise_draws"].startswith("combine: separate")


def test_separate_draw_d_is_the_features_of_noise_draw_d(images, tmp_path):
    """Draw 1 of a separate store is the single-draw feature of noise draw 1: the mean store of draws {0, 1}
    is their average (same forwards, no extra randomness)."""
    grid = {"features": {"timesteps": [50], "blocks": [4], "pooling": [], "tokens": 4}, "views": {"hflip": False}}
    sep = _spec(images, noise={"draws": 2, "combine": "separate"}, storage={"dtype": "float32"}, **grid)
    mean = _spec(images, noise={"draws": 2}, storage={"dtype": "float32"}, **grid)
    extract(sep, tmp_path / "sep.zarr", progress=False)
    extract(mean, tmp_path / "mean.zarr", progress=False)
    s, m = open_store(tmp_path / "sep.zarr"), open_store(tmp_path / "mean.zarr")
    name = "t050_b04_tok4"
    averaged = (s.read(name).astype(np.float64) + s.read(name + "_d1")) / 2
    # pooling is linear, so mean-then-pool and pool-then-mean agree up to float32 rounding
    np.testing.assert_allclose(averaged, m.read(name), rtol=1e-5, atol=1e-6)
    assert not np.allclose(s.read(name), m.read(name), atol=1e-4)


def test_separate_draws_resume_only_the_missing_draws(images, tmp_path):
    """An interrupted separate-draws run resumes unit by unit and ends with the same bytes as an uninterrupted one."""
    spec = _spec(images, noise={"draws": 2, "combine": "separate"})
    extract(spec, tmp_path / "whole.zarr", progress=False)
    extract(spec, tmp_path / "parts.zarr", progress=False, units=[0, 2], finalize=False)
    extract(spec, tmp_path / "parts.zarr", progress=False)
    assert_same_arrays(arrays(tmp_path / "whole.zarr"), arrays(tmp_path / "parts.zarr"))


def test_each_local_dask_worker_takes_its_own_gpu(monkeypatch):
    import types

    import dask.distributed

    from extract.pipeline import worker_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert worker_device(torch.device("cuda")) == torch.device("cuda")  # outside a worker: unchanged
    for name, expected in ((0, "cuda:0"), (2, "cuda:2"), (5, "cuda:1"), ("tcp-worker", "cuda")):
        monkeypatch.setattr(dask.distributed, "get_worker", lambda name=name: types.SimpleNamespace(name=name))
        assert worker_device(torch.device("cuda")) == torch.device(expected)
    assert worker_device(torch.device("cuda:3")) == torch.device("cuda:3")  # an explicit index is kept
    assert worker_device(torch.device("cpu")) == torch.device("cpu")
