"""diffusers UNet2DModel as a model family: every tap equals a hook on diffusers' own forward, early exit,
local-only loading, the scheduler's noise schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from extract.diffusion import NoiseSchedule  # noqa: E402
from extract.models.diffusers_unet import (  # noqa: E402
    DDPM_CIFAR10_LAYOUT,
    DiffusersModelError,
    DiffusersUNet,
    describe,
    load_unet,
    locate,
    tap_modules,
)

CIFAR10 = DDPM_CIFAR10_LAYOUT  # used at 32x32
CLASS_COND = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
    num_class_embeds=10,
)
SMALL = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    time_embedding_type="fourier",
    flip_sin_to_cos=True,
)
CONFIGS = {"cifar10": CIFAR10, "class_cond": CLASS_COND, "small": SMALL}


def save_unet(directory, config: dict, seed: int = 0, scheduler: dict | None = None):
    """A randomly initialised UNet2DModel saved as diffusers does (a pipeline folder with a scheduler)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**config)
    if scheduler is None:
        unet.save_pretrained(directory)
    else:
        unet.save_pretrained(directory / "unet")
        diffusers.DDPMScheduler(**scheduler).save_pretrained(directory / "scheduler")
    return unet.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, config in CONFIGS.items():
        d = tmp_path_factory.mktemp(name)
        reference = save_unet(d, config, seed=len(name))
        out[name] = (d, reference)
    return out


def hooked_outputs(unet, x, t, y):
    """Every tap's output as a forward hook on diffusers' own forward sees it."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, p=path: seen.__setitem__(p, o[0] if isinstance(o, tuple) else o))
        for path, m in tap_modules(unet).items()
    ]
    try:
        with torch.no_grad():
            unet(x, t, class_labels=y)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_tap_equals_a_hook_on_diffusers_forward(saved, name):
    directory, reference = saved[name]
    model, record = DiffusersUNet.from_pretrained(directory)
    config = CONFIGS[name]
    size, channels = config["sample_size"], config.get("in_channels", 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, size, size, generator=gen)
    y = torch.tensor([3, 7]) if "num_class_embeds" in config else None
    paths = [b.module for b in model.blocks]
    assert len(set(paths)) == len(paths) == len(tap_modules(reference))
    for step in (1, 250, 999):  # fourier embeds log(t): t = 0 would be -inf in diffusers too
        t = torch.full((2,), step, dtype=torch.long)
        expected = hooked_outputs(reference, x, t, y)
        with torch.no_grad():
            got = model.features(x, t, paths, y=y)
        for info in model.blocks:
            ref = expected[info.module]
            out = got[info.module]
            assert out.shape == (2, info.channels, info.resolution, info.resolution), info
            rel = (out - ref).abs().max() / ref.abs().max()
            assert rel <= 1e-5, (name, step, info.module, float(rel))
    assert record["family"] == "diffusers" and len(record["checkpoint_sha256"]) == 64


def test_taps_are_numbered_in_forward_order(saved):
    model, _ = DiffusersUNet.from_pretrained(saved["cifar10"][0])
    names = [b.module for b in model.blocks]
    assert names[0] == "conv_in"
    # A block is complete after its own sub-modules; the attention follows its resnet.
    assert (
        names.index("down_blocks.1.resnets.0")
        < names.index("down_blocks.1.attentions.0")
        < names.index("down_blocks.1.resnets.1")
    )
    assert names.index("down_blocks.1.downsamplers.0") + 1 == names.index("down_blocks.1")
    assert names[-1] == "up_blocks.3"
    assert [b.number for b in model.blocks] == list(range(1, len(names) + 1))
    info = model.block_info("down_blocks.1.attentions.0")
    assert (info.channels, info.resolution) == (256, 16)  # AttnDownBlock2D at 16x16
    assert model.block_info(str(info.number)) == info == model.block_info(info.number)


def test_nothing_after_the_deepest_tap_runs(saved):
    model, _ = DiffusersUNet.from_pretrained(saved["cifar10"][0])
    ran = []
    for path, module in tap_modules(model.unet).items():
        module.register_forward_hook(lambda *_a, p=path: ran.append(p))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.features(x, torch.tensor([10]), ["down_blocks.1.attentions.0"])
    assert ran[-1] == "down_blocks.1.attentions.0"
    assert "down_blocks.1.resnets.1" not in ran and "mid_block" not in ran
    ran.clear()
    with torch.no_grad():
        model.features(x, torch.tensor([10]), ["mid_block"])
    assert ran[-1] == "mid_block" and not any(p.startswith("up_blocks") for p in ran)


def test_class_labels_are_required_and_used(saved):
    model, _ = DiffusersUNet.from_pretrained(saved["class_cond"][0])
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5, 5])
    with pytest.raises(ValueError, match="class-conditional"):
        model.features(x, t, ["mid_block"])
    with torch.no_grad():
        a = model.features(x, t, ["mid_block"], y=torch.tensor([0, 0]))["mid_block"]
        b = model.features(x, t, ["mid_block"], y=torch.tensor([1, 1]))["mid_block"]
    assert not torch.allclose(a, b)
    small, _ = DiffusersUNet.from_pretrained(saved["small"][0])
    with pytest.raises(ValueError, match="unconditional"):
        small.features(torch.randn(1, 1, 8, 8), torch.tensor([1]), [1], y=torch.tensor([0]))


def test_unknown_tap_names_the_taps(saved):
    model, _ = DiffusersUNet.from_pretrained(saved["small"][0])
    with pytest.raises(ValueError, match="no tap named 'mid_blok'"):
        model.block_info("mid_blok")
    with pytest.raises(ValueError, match=f"taps 1..{model.num_blocks}"):
        model.block_info(model.num_blocks + 1)


def test_hub_ids_remote_urls_and_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(DiffusersModelError, match="hub id.*never downloads"):
        locate("google/ddpm-cifar10-32")
    with pytest.raises(DiffusersModelError, match="not a local path"):
        locate("https://huggingface.co/google/ddpm-cifar10-32")
    with pytest.raises(DiffusersModelError, match="does not exist"):
        locate(tmp_path / "nowhere")
    with pytest.raises(DiffusersModelError, match="neither config.json"):
        locate(tmp_path)


def test_other_model_classes_and_missing_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(DiffusersModelError, match="UNet2DConditionModel, not a UNet2DModel"):
        describe(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
    with pytest.raises(DiffusersModelError, match="has no weights"):
        describe(tmp_path)


def test_bin_weights_load_weights_only_and_pickles_are_refused(tmp_path, saved):
    reference = saved["small"][1]
    directory = tmp_path / "bin"
    reference.save_pretrained(directory, safe_serialization=False)
    unet, record = load_unet(directory)
    assert record["checkpoint"].endswith(".bin")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(unet.state_dict()[key], value, rtol=0, atol=0)
    import pickle

    (directory / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"a": object()}, protocol=2))
    with pytest.raises(DiffusersModelError, match="weights_only"):
        load_unet(directory)


@pytest.mark.parametrize(
    "scheduler",
    [
        dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012),
        dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        dict(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_the_noise_schedule_is_the_schedulers(tmp_path, scheduler):
    save_unet(tmp_path, SMALL, scheduler=scheduler)
    record = describe(tmp_path)
    schedule = NoiseSchedule.from_scheduler_config(record["scheduler"])
    reference = diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    assert schedule.num_steps == scheduler["num_train_timesteps"]
    np.testing.assert_array_equal(schedule.betas, reference.betas.double().numpy())
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.double().numpy(), rtol=1e-5)


def test_an_unsupported_beta_schedule_is_named():
    with pytest.raises(ValueError, match="unsupported beta_schedule 'sigmoid'"):
        NoiseSchedule.from_scheduler_config({"beta_schedule": "sigmoid"})


# ---------------------------------------------------------------------------------------------
# The spec and an extraction
# ---------------------------------------------------------------------------------------------

TINY = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)
TINY_SCHEDULER = dict(num_train_timesteps=200, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny") / "pipeline"
    save_unet(directory, TINY, scheduler=TINY_SCHEDULER)
    return directory


def tiny_spec(path, **model):
    return {
        "name": "tiny-diffusers",
        "model": {"family": "diffusers", "path": str(path), **model},
        "dataset": {"kind": "digits", "splits": ["train", "test"], "limit": {"train": 12, "test": 6}},
        "features": {"timesteps": [10, 150], "blocks": ["down_blocks.1.attentions.0", "mid_block"], "pooling": [1, 2]},
        "storage": {"dtype": "float32", "chunk_rows": 8},
        "compute": {"device": "cpu"},
    }


def test_a_spec_resolves_taps_schedule_and_round_trips(tiny):
    from extract.spec import load_spec

    spec = load_spec(tiny_spec(tiny))
    numbers = {b.module: b.number for b in spec.block_table}
    assert spec.grid.blocks == tuple(sorted((numbers["down_blocks.1.attentions.0"], numbers["mid_block"])))
    assert (spec.model.noise_schedule, spec.model.diffusion_steps) == ("scaled_linear", 200)
    assert spec.to_dict()["model"] == {"family": "diffusers", "path": str(tiny)}
    again = load_spec(spec.to_dict())
    assert again.fingerprint == spec.fingerprint and again.model == spec.model


def test_spec_problems_are_named(tiny, tmp_path):
    from extract.spec import SpecError, load_spec

    bad = tiny_spec(tiny)
    bad["features"] = {"timesteps": [200], "blocks": ["mid_blok"]}
    bad["model"]["preset"] = "64x64_diffusion"
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    text = str(err.value)
    assert "features.blocks[0]: this model has no block named 'mid_blok' (did you mean 'mid_block'?)" in text
    assert "features.timesteps[0]: 200 is outside [0, 200)" in text
    assert "model.preset: is for model.family: adm" in text
    with pytest.raises(SpecError, match="model.path: 'google/ddpm-cifar10-32' looks like a Hugging Face hub id"):
        load_spec(tiny_spec("google/ddpm-cifar10-32"))
    with pytest.raises(SpecError, match="model.path: .* does not exist"):
        load_spec(tiny_spec(tmp_path / "missing"))
    with pytest.raises(SpecError, match="model.class_label: this UNet is unconditional"):
        load_spec(tiny_spec(tiny, class_label=1))


def test_a_class_conditional_model_needs_a_class(saved):
    from extract.spec import SpecError, load_spec

    def spec(**model):
        out = tiny_spec(saved["class_cond"][0], **model)
        return out | {"features": {"timesteps": [5], "blocks": ["mid_block"]}}

    with pytest.raises(SpecError, match="model.class_label: this UNet is class-conditional"):
        load_spec(spec())
    with pytest.raises(SpecError, match="model.class_label: 10 is not among the model's 10 classes"):
        load_spec(spec(class_label=10))
    assert load_spec(spec(class_label=3)).model.class_label == 3
    assert load_spec(spec(class_label="dataset")).model.class_label == "dataset"
    with pytest.raises(SpecError, match="model.class_label"):
        load_spec(spec(class_label="labels"))


def test_diffbank_extract_writes_a_store_from_a_diffusers_model(tiny, tmp_path):
    import yaml
    from click.testing import CliRunner

    from diffbank.cli import main
    from extract.diffusion import seeded_noise
    from extract.overlap import load_batch
    from extract.pooling import pool
    from extract.preprocess import batch_to_model_range
    from extract.sources import open_source
    from extract.spec import load_spec
    from extract.store import open_store

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tiny)))
    store_path = tmp_path / "s.zarr"
    result = CliRunner().invoke(main, ["extract", str(spec_path), "--store", str(store_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    store = open_store(store_path)
    assert store.num_samples == 18
    prov = store.attrs["provenance"]
    assert prov["family"] == "diffusers" and len(prov["checkpoint_sha256"]) == 64
    assert prov["noise_schedule"]["scheduler"]["beta_schedule"] == "scaled_linear"

    # One feature recomputed by hand: the scheduler's schedule, seeded noise, the network's tap, pooling.
    spec = load_spec(spec_path)
    model, _ = DiffusersUNet.from_pretrained(tiny)
    source = open_source(spec.dataset)
    rows = np.arange(4)
    x0 = batch_to_model_range(load_batch(source, 8, "reference", False, 0, 0, rows).pixels)
    schedule = NoiseSchedule.from_scheduler_config(spec.model.scheduler)
    t = 150
    x_t = schedule.q_sample(x0, t, seeded_noise(0, rows.tolist(), t, 0, tuple(x0.shape[1:])))
    tap = model.block_info("mid_block")
    with torch.no_grad():
        h = model.features(x_t, torch.full((4,), t), [tap.number])[tap.number]
    name = f"t{t:03d}_b{tap.number:02d}_avg2"
    assert name in store.feature_names()
    np.testing.assert_allclose(store.read(name, rows), pool(h, ("avg", 2)).numpy(), rtol=1e-4, atol=1e-5)


def test_model_blocks_lists_taps_and_their_flop_share(tiny):
    import json

    from click.testing import CliRunner

    from diffbank.cli import main

    result = CliRunner().invoke(main, ["model", "blocks", "--model", str(tiny), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    taps = record["taps"]
    model, _ = DiffusersUNet.from_pretrained(tiny)
    assert [(t["number"], t["module"], t["channels"], t["resolution"]) for t in taps] == [
        (b.number, b.module, b.channels, b.resolution) for b in model.blocks
    ]
    # The time embedding's two linears (16 -> 64 -> 64), then conv_in (3 -> 16 channels, 3x3, on 8x8).
    assert taps[0]["flops"] == 2 * (16 * 64 + 64 * 64) + 2 * 3 * 16 * 9 * 8 * 8
    shares = [t["share"] for t in taps]
    assert shares == sorted(shares) and 0.95 < shares[-1] < 1  # the output head is the rest
    # At twice the image size every map side doubles.
    wide = CliRunner().invoke(main, ["model", "blocks", "--model", str(tiny), "--image-size", "16", "--json"])
    assert [t["resolution"] for t in json.loads(wide.output)["taps"]] == [2 * t["resolution"] for t in taps]


def test_model_blocks_reads_an_adm_spec(tmp_path):
    from click.testing import CliRunner

    from diffbank.cli import main

    spec = tmp_path / "adm.yaml"
    spec.write_text(
        "model: {preset: 'embedded:fmnist32'}\ndataset: {kind: digits, image_size: 32}\n"
        "features: {timesteps: [10], blocks: [3]}\n"
    )
    result = CliRunner().invoke(main, ["model", "blocks", str(spec)])
    assert result.exit_code == 0, result.output
    assert "middle_block" in result.output and "input_blocks.0" in result.output
    assert CliRunner().invoke(main, ["model", "blocks"]).exit_code == 2


def test_a_class_conditional_model_extracts_with_the_spec_class(saved, tmp_path):
    from extract.diffusion import seeded_noise
    from extract.overlap import load_batch
    from extract.pipeline import extract
    from extract.pooling import pool
    from extract.preprocess import batch_to_model_range
    from extract.sources import open_source
    from extract.spec import load_spec
    from extract.store import open_store

    spec = tiny_spec(saved["class_cond"][0], class_label=4)
    spec["features"] = {"timesteps": [20], "blocks": ["mid_block"], "pooling": [1]}
    spec["dataset"] |= {"image_size": 16, "limit": {"train": 4, "test": 2}}
    extract(spec, tmp_path / "c.zarr", progress=False)
    stored = open_store(tmp_path / "c.zarr").read(
        "t020_b" + f"{load_spec(spec).grid.blocks[0]:02d}" + "_avg1", np.arange(2)
    )

    # By hand: the spec's schedule (no scheduler/ folder: linear, 1000 steps), seeded noise, class 4.
    resolved = load_spec(spec)
    m = resolved.model
    schedule = NoiseSchedule.for_model(m.noise_schedule, m.diffusion_steps, m.scheduler)
    rows = np.arange(2)
    x0 = batch_to_model_range(load_batch(open_source(resolved.dataset), 16, "reference", False, 0, 0, rows).pixels)
    x_t = schedule.q_sample(x0, 20, seeded_noise(0, rows.tolist(), 20, 0, (3, 16, 16)))
    model, _ = DiffusersUNet.from_pretrained(saved["class_cond"][0])
    t = torch.full((2,), 20)
    with torch.no_grad():
        own = {
            c: pool(model.features(x_t, t, ["mid_block"], y=torch.full((2,), c))["mid_block"], "avg1") for c in (4, 5)
        }
    np.testing.assert_allclose(stored, own[4].numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(stored, own[5].numpy(), rtol=1e-4, atol=1e-5)


def test_class_label_dataset_gives_each_row_its_own_label(saved, tmp_path):
    from extract.pipeline import extract
    from extract.spec import load_spec
    from extract.store import open_store

    def store(class_label, name):
        spec = tiny_spec(saved["class_cond"][0], class_label=class_label)
        spec["features"] = {"timesteps": [20], "blocks": ["mid_block"], "pooling": [1]}
        spec["dataset"] |= {"image_size": 16, "limit": {"train": 6, "test": 2}}
        extract(spec, tmp_path / name, progress=False)
        return open_store(tmp_path / name), "t020_b" + f"{load_spec(spec).grid.blocks[0]:02d}" + "_avg1"

    per_row, name = store("dataset", "d.zarr")
    labels = per_row.labels
    assert len(set(labels.tolist())) > 1
    assert per_row.attrs["spec"]["model"]["class_label"] == "dataset"
    features = per_row.read(name)
    for label in sorted(set(labels.tolist()))[:2]:
        fixed, _ = store(int(label), f"c{label}.zarr")
        rows = np.flatnonzero(labels == label)
        np.testing.assert_array_equal(features[rows], fixed.read(name, rows))  # same rows, same class: same bytes
        others = np.flatnonzero(labels != label)
        assert not np.allclose(features[others], fixed.read(name, others))


def test_a_diffusers_store_resumes_and_is_byte_identical(tiny, tmp_path):
    from extract.pipeline import extract
    from extract.store import open_store

    spec = tiny_spec(tiny)
    spec["dataset"]["limit"] = {"train": 8, "test": 8}
    spec["storage"] = {"dtype": "float16", "chunk_rows": 4, "shard_rows": 4}
    first = extract(spec, tmp_path / "a.zarr", progress=False, units=[0, 2])  # an interrupted run
    assert first["units_computed"] == [0, 2]
    resumed = extract(spec, tmp_path / "a.zarr", progress=False)
    assert resumed["units_computed"] == [1, 3]
    extract(spec, tmp_path / "b.zarr", progress=False)
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    for name in a.feature_names():
        assert a.read(name).tobytes() == b.read(name).tobytes(), name


def test_two_dask_workers_write_the_bytes_of_one_process(tiny, tmp_path):
    pytest.importorskip("distributed")
    from extract.cluster import extract_distributed
    from extract.pipeline import extract
    from extract.store import open_store

    spec = tiny_spec(tiny)
    spec["dataset"]["limit"] = {"train": 8, "test": 8}
    spec["storage"] |= {"shard_rows": 8}
    extract(spec, tmp_path / "one.zarr", progress=False)
    two = extract_distributed(spec, tmp_path / "two.zarr", workers=2, progress=False)
    assert two["complete"]
    one_fs, two_fs = open_store(tmp_path / "one.zarr"), open_store(tmp_path / "two.zarr")
    for name in one_fs.feature_names():
        assert one_fs.read(name).tobytes() == two_fs.read(name).tobytes(), name
