"""Training the embedded model: deterministic, resumable, exportable; sampling produces images."""

import json

import pytest
import torch

from extract.diffusion import NoiseSchedule
from extract.models.config import TINY_FLAGS
from extract.models.sampling import ddim_sample, image_grid
from extract.models.training import TrainConfig, autocast_dtype, ema_model, export_ema, train
from extract.statedir import load_state

FLAGS = {**TINY_FLAGS, "use_scale_shift_norm": True, "resblock_updown": True}


def _images(n=24):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def _cfg(**kw):
    return TrainConfig(flags=FLAGS, steps=4, batch_size=8, checkpoint_every=2, autocast="none", **kw)


def test_resumed_run_equals_uninterrupted_run(tmp_path, caplog):
    images = _images()
    quiet = {"progress": False}
    full = train(images, _cfg(), tmp_path / "full", **quiet)
    first = train(images, _cfg(), tmp_path / "cut", until_step=3, **quiet)  # stops mid-run, off the save grid
    assert first["step"] == 3
    with caplog.at_level("INFO", logger="extract.models.training"):
        resumed = train(images, _cfg(), tmp_path / "cut", progress=False)
    assert "resuming from step 3" in caplog.text
    assert resumed["step"] == full["step"] == 4
    for name in ("ema", "online"):
        a = {k: v for k, v in load_state(tmp_path / "full")[0].items() if k.startswith(name + ".")}
        b = {k: v for k, v in load_state(tmp_path / "cut")[0].items() if k.startswith(name + ".")}
        assert a
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_training_reduces_loss_and_is_seeded(tmp_path):
    images = _images(16)
    cfg = TrainConfig(flags=FLAGS, steps=12, batch_size=8, checkpoint_every=4, autocast="none", lr=3e-3, warmup_steps=1)
    rec = train(images, cfg, tmp_path / "a", progress=False)
    losses = [loss for _, loss in rec["losses"]]
    assert losses[-1] < losses[0]
    rec_b = train(images, cfg, tmp_path / "b", progress=False)
    assert rec_b["losses"] == rec["losses"]


def test_changed_config_is_refused(tmp_path):
    images = _images()
    train(images, _cfg(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="differs in: lr"):
        train(images, TrainConfig(**{**_cfg().__dict__, "lr": 1e-3}), tmp_path, progress=False)


def test_bad_images_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 16, 16\)"):
        train(torch.zeros(4, 1, 16, 16), _cfg(), tmp_path, progress=False)


def test_export_card_and_sampling(tmp_path):
    images = _images()
    train(images, _cfg(), tmp_path / "run", progress=False)
    path = export_ema(tmp_path / "run", tmp_path / "w" / "m.safetensors", "m", command="diffbank train ...")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["flags"] == FLAGS and card["steps"] == 4 and card["command"]
    model = ema_model(tmp_path / "run", FLAGS)
    x = ddim_sample(model, NoiseSchedule.from_flags("linear", 1000), 4, steps=5, seed=3)
    assert x.shape == (4, 3, 16, 16) and x.abs().max() <= 1
    assert torch.equal(x, ddim_sample(model, NoiseSchedule.from_flags("linear", 1000), 4, steps=5, seed=3))
    grid = image_grid(x, nrow=2)
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3) and grid.dtype.name == "uint8"


def test_autocast_choice():
    assert autocast_dtype("none", torch.device("cpu")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


def test_min_snr_weighting_and_time_box_and_snapshots(tmp_path):
    images = _images()
    cfg = _cfg(weighting="min-snr")
    rec = train(images, cfg, tmp_path / "a", progress=False, max_seconds=0.0, snapshot_images=(8, 16))
    assert rec["step"] == 1  # the wall-clock limit stops after the first step, checkpointed
    assert [s["mark_images"] for s in rec["snapshots"]] == [8]
    rec = train(images, cfg, tmp_path / "a", progress=False, snapshot_images=(8, 16))
    assert rec["step"] == 4 and [s["mark_images"] for s in rec["snapshots"]] == [8, 16]
    assert (tmp_path / "a" / "snapshots" / "ema_000000016.safetensors").is_file()
    # the weighting changes the loss (same data, noise and init), so it is really applied
    plain = train(images, _cfg(), tmp_path / "b", progress=False)
    assert rec["losses"][-1][1] != plain["losses"][-1][1]
    with pytest.raises(ValueError, match="weighting"):
        _cfg(weighting="snr")
