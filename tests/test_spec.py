"""extract/spec: validation (every problem at once), resolution, fingerprint, size."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from extract.spec import SpecError, load_spec, spec_only_adds

SPECS = Path(__file__).resolve().parents[1] / "cache_specs"

# A tiny ADM: 13 blocks; 5 = input_blocks.4 (64 ch, 8x8), 7 = middle_block (64, 8x8), 10 = output_blocks.2 (64, 16x16).
TINY_FLAGS = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2,2",
    "attention_resolutions": "16,8",
    "num_head_channels": 16,
    "learn_sigma": True,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
}


def base() -> dict:
    return {
        "name": "tiny",
        "model": {"flags": dict(TINY_FLAGS)},
        "dataset": {"kind": "digits", "splits": ["train", "test"]},
        "features": {"timesteps": [50, 150], "blocks": [5, 7, 10]},
    }


def problems_of(raw: dict, **kw) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(raw, **kw)
    return info.value.problems


def edit(path: str, value) -> dict:
    raw = base()
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


# -- resolution --------------------------------------------------------------------------------


def test_defaults_are_filled_and_resolved_form_round_trips():
    spec = load_spec(base())
    d = spec.to_dict()
    json.dumps(d)  # JSON-able
    assert d["model"]["noise_schedule"] == "linear" and d["model"]["diffusion_steps"] == 1000
    assert d["model"]["flags"]["num_channels"] == 32 and "num_heads" in d["model"]["flags"]
    assert d["dataset"]["image_size"] == 32 and d["dataset"]["preprocess"] == "reference"
    assert d["features"]["pooling"] == {"5": [2], "7": [2], "10": [2]} and d["features"]["tokens"] == {}
    assert d["noise"] == {"seed": 0, "draws": 1}
    assert d["views"] == {"center": True, "hflip": False}
    assert d["storage"] == {"dtype": "float16", "compressor": "blosc-lz4", "chunk_rows": 64, "shard_rows": None}
    assert d["compute"] == {"dtype": "float32", "batch_size": 32, "device": "auto", "num_workers": 0}
    again = load_spec(d)
    assert again == spec and again.to_dict() == d and again.fingerprint == spec.fingerprint


def test_features_are_resolved_with_shapes_and_names():
    raw = base()
    raw["features"].update(
        blocks=["middle_block", 10], pooling={"default": [2], "middle_block": [1, 2]}, tokens={10: 8}
    )
    raw["views"] = {"hflip": True}
    spec = load_spec(raw)
    names = [f.name for f in spec.features()]
    assert names[:6] == [
        "t050_b07_avg1",
        "t050_b07_avg1_flip",
        "t050_b07_avg2",
        "t050_b07_avg2_flip",
        "t050_b10_avg2",
        "t050_b10_avg2_flip",
    ]
    tok = [f for f in spec.features() if f.pool_kind == "tok"][0]
    assert (tok.block, tok.module, tok.channels, tok.resolution) == (10, "output_blocks.2", 64, 16)
    assert tok.shape == (64, 8, 8)
    big = load_spec(edit("features.tokens", 64))
    assert {f.shape for f in big.features() if f.pool_kind == "tok"} == {(64, 8, 8), (64, 16, 16)}  # at most s x s
    assert [b.number for b in spec.model_block_table()] == list(range(1, 14))


def test_dataset_image_size_scales_block_maps():
    spec = load_spec(edit("dataset.image_size", 64))
    assert {b.number: b.resolution for b in spec.model_block_table()}[5] == 16
    assert any("dataset.image_size: 34 is not divisible by 4" in p for p in problems_of(edit("dataset.image_size", 34)))


def test_shipped_specs_resolve(tmp_path):
    small = load_spec(SPECS / "cpu_small.yaml")
    assert small.name == "cpu_small" and small.known_num_samples() == 384
    linear = load_spec(SPECS / "imagenet_linear.yaml", check_files=False)
    (f,) = linear.features()
    assert (f.name, f.module, f.shape) == ("t090_b24_avg2", "output_blocks.4", (1024, 2, 2))
    grid = load_spec(SPECS / "difformer_grid.yaml", check_files=False)
    assert grid.grid.timesteps == (90, 150, 300) and grid.grid.blocks == (19, 24, 30)
    assert {f.shape for f in grid.features() if f.pool_kind == "tok"} == {(1024, 8, 8), (1024, 16, 16), (512, 16, 16)}
    (fine,) = load_spec(SPECS / "finegrained.yaml", check_files=False).features()
    assert (fine.name, fine.shape) == ("t150_b19_avg4", (1024, 4, 4))
    # With file checks, exactly the missing checkpoint and dataset are reported.
    problems = problems_of(SPECS / "imagenet_linear.yaml", base_dir=tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("model.checkpoint: 'checkpoints/256x256_diffusion_uncond.pt' does not exist")
    assert problems[1].startswith("dataset.path:") and "does not exist" in problems[1]


def test_fmnist_demo_names_the_missing_embedded_model():
    from extract.models.config import embedded_models

    if "fmnist32" in embedded_models():
        assert load_spec(SPECS / "fmnist_demo.yaml", check_files=False).model.preset == "embedded:fmnist32"
    else:
        problems = problems_of(SPECS / "fmnist_demo.yaml", check_files=False)
        assert problems and all("fmnist32" in p for p in problems)
        assert problems[0].startswith("model.preset:")


# -- one message per bad field ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({**base(), "modle": {}}, "modle: unknown key (did you mean 'model'?)"),
        (edit("features.timestep", [1]), "features.timestep: unknown key (did you mean 'timesteps'?)"),
        (edit("model.flags.num_channel", 8), "model.flags.num_channel: unknown key (did you mean 'num_channels'?)"),
        (edit("model.preset", "256x256_diffusion_uncnd"), "model.preset: unknown model preset"),
        (edit("features.timesteps", [50, "90"]), "features.timesteps[1]: expected an integer, got str '90'"),
        (edit("features.timesteps", [50, True]), "features.timesteps[1]: expected an integer, got bool"),
        (edit("features.timesteps", [50, 1000]), "features.timesteps[1]: 1000 is outside [0, 1000)"),
        (edit("features.timesteps", [-1]), "features.timesteps[0]: -1 is outside [0, 1000)"),
        (edit("features.timesteps", [50, 50]), "features.timesteps[1]: duplicate value 50"),
        (edit("features.timesteps", []), "features.timesteps: must not be empty"),
        (edit("features.blocks", [5, 14]), "features.blocks[1]: block 14 does not exist: this model has blocks 1..13"),
        (
            edit("features.blocks", ["midle_block"]),
            "features.blocks[0]: this model has no block named 'midle_block' (did you mean 'middle_block'?)",
        ),
        (edit("features.blocks", [7, "middle_block"]), "features.blocks[1]: duplicate block 7"),
        (edit("features.pooling", {7: [16]}), "features.pooling.7: average pool 16 is larger than block 7's 8x8 map"),
        (edit("features.pooling", [2, 9]), "features.pooling: average pool 9 is larger than block 5's 8x8 map"),
        (edit("features.pooling", {12: [2]}), "features.pooling.12: block 12 is not among features.blocks"),
        (edit("features.pooling", [0]), "features.pooling[0]: must be >= 1"),
        (edit("features.pooling", []), "features.pooling: block 5 has neither average pooling nor tokens"),
        (edit("features.tokens", {5: "big"}), "features.tokens.5: expected an integer, got str 'big'"),
        (edit("dataset.kind", "folders"), "dataset.kind: unknown dataset kind 'folders' (did you mean 'folder'?)"),
        (edit("dataset.splits", ["train", "val"]), "dataset.splits[1]: the digits dataset has splits train, test"),
        (
            edit("dataset.limit", {"tain": 5}),
            "dataset.limit.tain: 'tain' is not among dataset.splits (did you mean 'train'?)",
        ),
        (edit("dataset.limit", 0), "dataset.limit: must be >= 1"),
        (edit("dataset.path", "x"), "dataset.path: must be null for the digits dataset"),
        (
            edit("model.noise_schedule", "cosin"),
            "model.noise_schedule: unknown noise schedule 'cosin' (did you mean 'cosine'?)",
        ),
        (edit("noise.draws", 0), "noise.draws: must be >= 1"),
        (edit("noise.combine", "stack"), "noise.combine: unknown noise combine 'stack'"),
        (edit("noise.seed", 1.5), "noise.seed: expected an integer, got float 1.5"),
        (edit("views.center", "yes"), "views.center: expected true or false"),
        ({**base(), "views": {"center": False}}, "views: at least one of center and hflip must be true"),
        (edit("storage.dtype", "float61"), "storage.dtype: unknown storage dtype 'float61' (did you mean 'float16'?)"),
        (edit("storage.dtype", "bfloat16"), "bfloat16 is not a core zarr dtype"),
        (edit("storage.compressor", "lz4"), "storage.compressor: unknown compressor 'lz4'"),
        (edit("storage.shard_rows", 100), "storage.shard_rows: 100 is not a multiple of chunk_rows=64"),
        (edit("compute.dtype", "bf16"), "compute.dtype: unknown compute dtype 'bf16'"),
        (edit("compute.device", "gpu"), "compute.device: unknown device 'gpu'"),
        (edit("compute.batch_size", 0), "compute.batch_size: must be >= 1, got 0"),
        ({k: v for k, v in base().items() if k != "features"}, "features: section is required"),
        ({**base(), "version": 7}, "version: unsupported spec version 7"),
    ],
)
def test_each_bad_field_has_its_own_message(raw, expected):
    problems = problems_of(raw)
    assert any(expected in p for p in problems), problems


def test_missing_files_are_reported_and_no_files_skips_them(tmp_path):
    raw = base()
    raw["model"]["checkpoint"] = "weights/missing.pt"
    raw["dataset"] = {"kind": "folder", "path": "nowhere"}
    problems = problems_of(raw, base_dir=tmp_path)
    assert problems[0].startswith("model.checkpoint: 'weights/missing.pt' does not exist")
    assert problems[1] == f"dataset.path: {tmp_path / 'nowhere'} does not exist"
    assert load_spec(raw, base_dir=tmp_path, check_files=False).model.checkpoint == "weights/missing.pt"
    (tmp_path / "nowhere" / "train").mkdir(parents=True)
    raw["dataset"]["splits"] = ["train", "test"]
    problems = problems_of(raw, base_dir=tmp_path)
    assert any(p.startswith("dataset.path:") and "no split 'test'" in p for p in problems)


def test_unreadable_dataset_file(tmp_path):
    (tmp_path / "bank.h5").write_bytes(b"not an hdf5 file")
    raw = edit("dataset", {"kind": "hdf5", "path": str(tmp_path / "bank.h5")})
    (problem,) = problems_of(raw)
    assert problem.startswith("dataset.path: cannot open HDF5 bank")


def test_every_problem_is_reported_at_once():
    raw = base()
    raw["modle"] = 1
    raw["features"].update(timesteps=[50, 1000], blocks=[5, 99], pooling={5: [16]})
    raw["storage"] = {"dtype": "float8", "chunk_rows": "64"}
    raw["compute"] = {"device": "tpu"}
    raw["views"] = {"hflip": "no"}
    problems = problems_of(raw)
    prefixes = [
        "modle:",
        "features.timesteps[1]:",
        "features.blocks[1]:",
        "features.pooling.5:",
        "storage.dtype:",
        "storage.chunk_rows:",
        "compute.device:",
        "views.hflip:",
    ]
    assert len(problems) == len(prefixes), problems
    for prefix in prefixes:
        assert sum(p.startswith(prefix) for p in problems) == 1, (prefix, problems)
    with pytest.raises(SpecError, match=r"8 problem\(s\)"):
        load_spec(raw)


def test_yaml_file_errors_and_name_default(tmp_path):
    path = tmp_path / "my_spec.yaml"
    path.write_text(
        "model: {flags: {image_size: 32, num_channels: 32, num_res_blocks: 1, channel_mult: '1,2,2',"
        " num_head_channels: 16}}\ndataset: {kind: digits}\nfeatures: {timesteps: [10], blocks: [3]}\n"
    )
    assert load_spec(path).name == "my_spec"
    path.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec(tmp_path / "absent.yaml")


# -- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_ignores_run_only_settings():
    ref = load_spec(base()).fingerprint
    assert len(ref) == 64 and load_spec(base()).fingerprint == ref
    run_only = base()
    run_only["name"] = "renamed"
    run_only["compute"] = {"batch_size": 7, "device": "cuda:1", "num_workers": 5}
    assert load_spec(run_only).fingerprint == ref
    reordered = base()
    reordered["features"].update(timesteps=[150, 50], blocks=["output_blocks.2", "middle_block", 5])
    assert load_spec(reordered).fingerprint == ref
    defaults_spelled_out = base()
    defaults_spelled_out["storage"] = {"dtype": "float16"}
    defaults_spelled_out["features"]["pooling"] = {"default": [2]}
    assert load_spec(defaults_spelled_out).fingerprint == ref


@pytest.mark.parametrize(
    "path, value",
    [
        ("noise.seed", 1),
        ("noise.draws", 2),
        ("noise.combine", "separate"),
        ("noise.rule", "counter"),
        ("storage.dtype", "float32"),
        ("compute.dtype", "bfloat16"),
        ("features.timesteps", [50]),
        ("views.hflip", True),
        ("model.init_seed", 3),
        ("dataset.limit", 10),
        ("storage.chunk_rows", 32),
    ],
)
def test_fingerprint_changes_with_content(path, value):
    assert load_spec(edit(path, value)).fingerprint != load_spec(base()).fingerprint


def test_default_noise_rule_is_left_out_of_the_recorded_spec():
    """Stores written before noise rules existed keep their fingerprint; a bad rule is named."""
    assert load_spec(edit("noise.rule", "generator")).fingerprint == load_spec(base()).fingerprint
    assert "rule" not in load_spec(base()).to_dict()["noise"]
    assert load_spec(edit("noise.rule", "counter")).to_dict()["noise"]["rule"] == "counter"
    (problem,) = problems_of(edit("noise.rule", "philox"))
    assert problem == "noise.rule: unknown value 'philox'; choose one of generator, counter"


# -- size ----------------------------------------------------------------------------------------


def test_size_estimate_formula():
    raw = base()
    raw["features"].update(timesteps=[10, 20, 30], blocks=[5, 10], pooling={5: [2, 4], 10: [1]}, tokens={10: 8})
    raw["views"] = {"hflip": True}
    spec = load_spec(raw)
    itemsize, views, n_t = 2, 2, 3
    per_t = 64 * 2 * 2 + 64 * 4 * 4 + 64 * 1 * 1 + 64 * 8 * 8  # Σ C·p² over (block, pooling)
    assert spec.bytes_per_sample() == per_t * itemsize * n_t * views
    assert spec.estimated_bytes(1000) == 1000 * per_t * itemsize * n_t * views
    raw["storage"] = {"dtype": "float32"}
    assert load_spec(raw).estimated_bytes(10) == 2 * spec.estimated_bytes(10)
    raw["noise"] = {"draws": 4}  # draws are averaged: no extra bytes
    assert load_spec(raw).estimated_bytes(10) == 2 * spec.estimated_bytes(10)
    raw["noise"] = {"draws": 4, "combine": "separate"}  # each draw stored: K times the bytes
    assert load_spec(raw).estimated_bytes(10) == 4 * 2 * spec.estimated_bytes(10)


def test_noise_draws_cost_is_said_and_separate_lists_one_array_per_draw():
    averaged = load_spec(edit("noise", {"draws": 4}))
    separate = load_spec(edit("noise", {"draws": 4, "combine": "separate"}))
    for spec in (averaged, separate):  # K forwards per image and timestep, however the draws are kept
        assert spec.forwards_per_image() == 2 * 4
        assert "8 U-Net forwards per image (2 timesteps x 4 noise draws x 1 view), 1,797 images" in spec.cost_summary(
            1797
        )
    assert "averaged into one array" in averaged.cost_summary(None)
    assert "each stored as its own array" in separate.cost_summary(None)
    assert len(separate.features()) == 4 * len(averaged.features())
    names = [f.name for f in separate.features() if f.t == 50 and f.block == 5]
    assert names == ["t050_b05_avg2", "t050_b05_avg2_d1", "t050_b05_avg2_d2", "t050_b05_avg2_d3"]
    assert {f.draws for f in separate.features()} == {4}


def test_combine_is_recorded_only_when_not_the_default():
    """Specs written before `combine` existed keep their resolved form, hence their fingerprint."""
    plain = load_spec(edit("noise", {"draws": 2}))
    assert plain.to_dict()["noise"] == {"seed": 0, "draws": 2}
    assert load_spec(edit("noise", {"draws": 2, "combine": "mean"})).fingerprint == plain.fingerprint
    separate = load_spec(edit("noise", {"draws": 2, "combine": "separate"}))
    assert separate.to_dict()["noise"] == {"seed": 0, "draws": 2, "combine": "separate"}
    assert load_spec(separate.to_dict()).fingerprint == separate.fingerprint  # round trip


def test_known_num_samples():
    assert load_spec(base()).known_num_samples() == 1797
    assert load_spec(edit("dataset.limit", {"test": 100})).known_num_samples() == 1438 + 100
    assert load_spec(edit("dataset.splits", ["test"])).known_num_samples() == 359


# -- extending a store -----------------------------------------------------------------------------


def test_spec_only_adds():
    old = load_spec(base()).to_dict()
    assert spec_only_adds(old, load_spec(base())) == []
    more = base()
    more["features"].update(timesteps=[50, 150, 300], pooling={"default": [2], 7: [1, 2]})
    more["compute"] = {"batch_size": 4}
    added = spec_only_adds(old, load_spec(more))
    assert sorted(f.name for f in added) == sorted(
        ["t050_b07_avg1", "t150_b07_avg1", "t300_b05_avg2", "t300_b07_avg1", "t300_b07_avg2", "t300_b10_avg2"]
    )
    assert spec_only_adds(old, load_spec(edit("noise.seed", 1))) is None
    assert spec_only_adds(old, load_spec(edit("features.timesteps", [50]))) is None  # drops features
    assert spec_only_adds(old, load_spec(edit("views.hflip", True))) is None
    broken = copy.deepcopy(old)
    broken["features"]["blocks"] = [99]
    assert spec_only_adds(broken, load_spec(base())) is None


# -- the command -------------------------------------------------------------------------------------


def test_spec_check_command(tmp_path):
    from click.testing import CliRunner

    from diffbank.commands.spec import spec_command

    runner = CliRunner()
    ok = runner.invoke(spec_command, ["check", str(SPECS / "cpu_small.yaml")])
    assert ok.exit_code == 0, ok.output
    fingerprint = load_spec(SPECS / "cpu_small.yaml").fingerprint
    assert f"fingerprint: {fingerprint}" in ok.output and "t050_b10_tok8" in ok.output
    assert "images: 384" in ok.output and "estimated store size: 7.22 MiB" in ok.output

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {preset: 256x256_diffusion_uncond, checkpoint: nowhere.pt}\n"
        "dataset: {kind: digits}\nfeatures: {timesteps: [1000], blocks: [24, 38]}\n"
    )
    failed = runner.invoke(spec_command, ["check", str(bad)])
    assert failed.exit_code == 2
    for text in ("3 problem(s)", "model.checkpoint:", "features.timesteps[0]:", "features.blocks[1]:"):
        assert text in failed.output
    as_json = runner.invoke(spec_command, ["check", str(bad), "--json", "--no-files"])
    assert as_json.exit_code == 2 and len(json.loads(as_json.output)["problems"]) == 2

    good = runner.invoke(spec_command, ["check", str(SPECS / "imagenet_linear.yaml"), "--no-files", "--json"])
    report = json.loads(good.output)
    assert good.exit_code == 0 and report["bytes_per_sample"] == 1024 * 4 * 2 and report["n_samples"] is None
    assert [f["name"] for f in report["features"]] == ["t090_b24_avg2"]
