"""DifFeed (probe.feedback): additions in the U-Net, the frozen backbone, exact reruns, resume, and the CLI."""

from __future__ import annotations

import json
import resource

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from extract.diffusion import NoiseSchedule
from extract.models.adm import ADMUNet
from extract.models.config import PRESETS
from probe.feedback.images import ImageSet, validation_split
from probe.feedback.network import (
    DifFeed,
    activation_bytes_per_sample,
    default_feedback_blocks,
    default_read_block,
    feedback_parameter_count,
    skip_partner,
)
from probe.feedback.training import _noised, train_feedback
from probe.heads import seeded_init
from probe.recipe import FeedbackRecipe

# 9 blocks at 16x16: encoder 1-4 (4 = 8x8 after the down block), middle 5, decoder 6-9.
# Defaults: feedback {6, 8} into {4, 2}; read block 8 (32 x 16 x 16).
FLAGS = {
    "image_size": 16,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "8",
    "num_head_channels": 32,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
}
HEAD = dict(dim=32, heads=2, depth=1)
SCHEDULE = NoiseSchedule.from_flags("linear", 1000)


def unet(seed: int = 0) -> ADMUNet:
    with seeded_init(seed):
        model = ADMUNet.from_flags(**FLAGS)
    # guided-diffusion zero-initialises the last conv of each residual branch; random values there make the
    # blocks' outputs depend on their inputs in every branch, which is what these tests need to see.
    with seeded_init(seed + 1), torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def difffeed(seed: int = 0, **kw) -> DifFeed:
    with seeded_init(seed):
        return DifFeed(unet(seed), 3, tokens=kw.pop("tokens", 4), **{**HEAD, **kw})


def images(n: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % 3
    x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    x[torch.as_tensor(labels == 0)] *= 0.2  # a learnable signal
    x[torch.as_tensor(labels == 1), 0] += 0.5
    return ImageSet.from_array(x, labels, keys=np.arange(100, 100 + n))


def noised(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 16, 16, generator=g), torch.full((n,), 150)


# -- the U-Net's additions ------------------------------------------------------------------------


def test_no_or_zero_additions_change_nothing():
    model = unet()
    x, t = noised()
    with torch.no_grad():
        plain = model.features(x, t, [3, 8])
        empty = model.features(x, t, [3, 8], additions={})
        zeros = model.features(x, t, [3, 8], additions={2: torch.zeros(4, 32, 16, 16)})
    for b in (3, 8):
        assert torch.equal(plain[b], empty[b])
        assert torch.equal(plain[b], zeros[b])


def test_an_addition_is_what_the_block_and_its_skip_carry():
    model = unet()
    x, t = noised()
    extra = torch.randn(4, 32, 16, 16)
    hook = model.input_blocks[1].register_forward_hook(lambda mod, inp, out: out + extra)  # block 2's output
    try:
        with torch.no_grad():
            expected = model.features(x, t, [2, 8])
    finally:
        hook.remove()
    with torch.no_grad():
        got = model.features(x, t, [2, 8], additions={2: extra})
        plain = model.features(x, t, [8])
    assert torch.equal(got[2], expected[2])
    torch.testing.assert_close(got[8], expected[8], rtol=0, atol=1e-6)  # block 8 reads block 2 only via the skip
    assert not torch.allclose(got[8], plain[8])


def test_additions_are_checked():
    model = unet()
    x, t = noised()
    with pytest.raises(ValueError, match="past the deepest"):
        model.features(x, t, [3], additions={4: torch.zeros(4, 64, 8, 8)})
    with pytest.raises(ValueError, match="must be"):
        model.features(x, t, [3], additions={2: torch.zeros(4, 16, 16, 16)})


# -- blocks ---------------------------------------------------------------------------------------


def test_defaults_are_the_papers_on_the_256_models():
    with torch.device("meta"):
        big = ADMUNet.from_flags(**PRESETS["256x256_diffusion_uncond"])
    blocks = default_feedback_blocks(big)
    assert blocks == [21, 24, 27, 30, 33, 36]
    assert [skip_partner(big, b) for b in blocks] == [17, 14, 11, 8, 5, 2]
    assert default_read_block(big) == 24
    assert feedback_parameter_count(big) == 2_759_680  # "about 2.8M"
    with torch.device("meta"):
        model = DifFeed(big, 1000)
    assert model.describe()["feedback_parameters"] == 2_759_680


def test_defaults_elsewhere_and_bad_choices():
    model = difffeed()
    assert model.feedback_blocks == [6, 8] and model.partners == {6: 4, 8: 2} and model.read_block == 8
    with pytest.raises(ValueError, match="not a decoder block"):
        difffeed(feedback_blocks=[3])
    with pytest.raises(ValueError, match="not before the read block"):
        difffeed(feedback_blocks=[6], read_block=3)  # block 6 feeds block 4, which pass 2 would not reach
    assert len(difffeed(feedback_blocks=[]).feedback) == 0


def test_activation_estimate_is_positive_and_scales_with_the_model():
    small = activation_bytes_per_sample(difffeed())
    assert small > 0
    assert activation_bytes_per_sample(difffeed(feedback_blocks=[])) < small  # no graph through the U-Net


# -- the two passes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zeroed_feedback_makes_pass_two_equal_pass_one(mode):
    model = difffeed()
    for layer in model.feedback.values():
        torch.nn.init.zeros_(layer[0].weight)
    model.train(mode == "train")
    x, t = noised()
    pass2 = model.read(x, t, model.additions(x, t))
    with torch.no_grad():
        pass1 = model.unet.features(x, t, [8])[8]
    pass1 = torch.nn.functional.adaptive_avg_pool2d(pass1, 4)
    assert pass2.requires_grad  # the graph runs through the U-Net, even though nothing there trains
    torch.testing.assert_close(pass2, pass1, rtol=0, atol=1e-6)


def test_a_step_trains_only_feedback_and_head():
    model = difffeed()
    frozen = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    data = images(12)
    train_feedback(
        model,
        SCHEDULE,
        data,
        data.subset(np.arange(3)),
        recipe=FeedbackRecipe(epochs=1, batch_size=6, lr=0.1),
        micro_batch=3,
        max_steps=1,
        progress=False,
    )
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None and not p.requires_grad for p in model.unet.parameters())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, trained[k])}
    for b in ("6", "8"):  # gradients reached both feedback layers through the U-Net's pass-2 activations
        assert f"feedback.{b}.0.weight" in changed
        assert model.feedback[b][0].weight.grad.abs().sum() > 0
    assert "head.classifier.weight" in changed


def test_a_rerun_is_exact_and_resume_continues_exactly(tmp_path):
    data = images(18)
    train, val = validation_split(data, 0.34, seed=0)
    test = images(6, seed=1)
    recipe = FeedbackRecipe(epochs=2, batch_size=4, lr=0.05, step_size=1, seed=5)

    def run(**kw):
        return train_feedback(
            difffeed(), SCHEDULE, train, val, test, recipe=kw.pop("recipe", recipe), micro_batch=2, progress=False, **kw
        )

    first, second = run(), run()
    for key in ("history", "test_predictions", "test_loss", "best_epoch"):
        if key == "history":
            strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first[key]]
            assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in second[key]]
        else:
            assert first[key] == second[key]
    out = tmp_path / "run"
    run(recipe=FeedbackRecipe(**{**recipe.__dict__, "epochs": 1}), out_dir=out)
    assert (out / "checkpoint" / "state.json").is_file()
    resumed = run(out_dir=out)
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in first["history"]]
    assert resumed["test_predictions"] == first["test_predictions"]
    assert json.loads((out / "results.json").read_text())["best_epoch"] == first["best_epoch"]
    with pytest.raises(ValueError, match="cannot resume"):
        run(recipe=FeedbackRecipe(**{**recipe.__dict__, "lr": 0.01}), out_dir=out)


def test_noise_is_fresh_per_epoch_and_fixed_for_evaluation():
    data = images(4)
    recipe = FeedbackRecipe()
    e0, _ = _noised(data, np.arange(4), SCHEDULE, recipe, 0, torch.device("cpu"))
    e1, _ = _noised(data, np.arange(4), SCHEDULE, recipe, 1, torch.device("cpu"))
    again, _ = _noised(data, np.array([2, 3]), SCHEDULE, recipe, 1, torch.device("cpu"))
    assert not torch.equal(e0, e1)
    assert torch.equal(again, e1[2:])  # a sample's noise does not depend on its batch


def test_step_memory_on_cpu_is_reported(capsys):
    """Peak RSS growth over one training step of batch 8 (printed; the figure goes in the report)."""
    model = difffeed()
    data = images(8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_feedback(
        model,
        SCHEDULE,
        data,
        data.subset(np.arange(2)),
        recipe=FeedbackRecipe(epochs=1, batch_size=8),
        micro_batch=8,
        max_steps=1,
        progress=False,
    )
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    estimate = activation_bytes_per_sample(model) * 8
    with capsys.disabled():
        print(
            f"\nDifFeed step, batch 8, 9-block test U-Net: saved activations {estimate / 2**20:.1f} MiB, "
            f"peak RSS growth {(after - before) / 1024:.1f} MiB (0 if an earlier test peaked higher)"
        )
    assert estimate > 0


# -- the command ----------------------------------------------------------------------------------


def test_cli_trains_from_a_spec_and_resumes(tmp_path):
    from diffbank.cli import main  # the command as users reach it: -q and -v come with the CLI

    spec = {
        "name": "tiny_feedback",
        "model": {"flags": dict(FLAGS), "checkpoint": None, "init_seed": 0},
        "dataset": {"kind": "digits", "splits": ["train", "test"], "limit": {"train": 30, "test": 9}},
        "features": {"timesteps": [150], "blocks": [8]},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    args = [
        str(path),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--micro-batch",
        "4",
        "--preset",
        "tiny",
        "--tokens",
        "4",
        "--device",
        "cpu",
        "--quiet",
        "--val-fraction",
        "0.2",
    ]
    result = CliRunner().invoke(main, ["probe", "feedback", *args])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["feedback_blocks"] == [6, 8] and results["num_test"] == 9
    assert results["train_split"] == "train" and results["test_split"] == "test"
    assert 0 <= results["test_accuracy"] <= 1 and (out / "weights.safetensors").is_file()
    again = CliRunner().invoke(main, ["probe", "feedback", *args[:4], "2", *args[5:]])
    assert again.exit_code == 0, again.output
    assert [r["epoch"] for r in json.loads((out / "results.json").read_text())["history"]] == [1, 2]
    bad = CliRunner().invoke(main, ["probe", "feedback", *args, "--t", "5000"])
    assert bad.exit_code != 0 and "outside" in bad.output
    if not torch.cuda.is_available():
        no_gpu = CliRunner().invoke(main, ["probe", "feedback", *args, "--device", "cuda"])
        assert no_gpu.exit_code != 0 and "CUDA" in no_gpu.output


# -- the t=150 ImageNet spec (issue 9, item 5) ----------------------------------------------------


def test_imagenet_linear_t150_differs_from_the_papers_text_only_in_t():
    from pathlib import Path

    from diffbank.commands.spec import spec_command
    from extract.spec import load_spec

    specs = Path(__file__).resolve().parents[1] / "cache_specs"
    text, scripts = (
        load_spec(specs / name, check_files=False) for name in ("imagenet_linear.yaml", "imagenet_linear_t150.yaml")
    )
    assert [f.name for f in scripts.features()] == ["t150_b24_avg2"]
    assert text.grid.timesteps == (90,) and scripts.grid.timesteps == (150,)
    assert (scripts.model, scripts.dataset, scripts.noise, scripts.storage) == (
        text.model,
        text.dataset,
        text.noise,
        text.storage,
    )
    assert "t=150" in (specs / "imagenet_linear.yaml").read_text().split("name:")[0]
    result = CliRunner().invoke(spec_command, ["check", "--no-files", str(specs / "imagenet_linear_t150.yaml")])
    assert result.exit_code == 0, result.output


def test_difffeed_and_its_baseline_start_from_the_same_head():
    with_feedback, baseline = difffeed(), difffeed(feedback_blocks=[])
    for (name, a), (_, b) in zip(with_feedback.head.state_dict().items(), baseline.head.state_dict().items()):
        assert torch.equal(a, b), name
