"""The ADM U-Net against reference outputs of guided-diffusion itself (tests/data/adm_tiny*).

The references were computed once, on another machine, by the original implementation: every comparison is
relative, within 1e-4 (1e-5 for the embedding): float32 kernels differ across instruction sets by about 1e-7
relative (an H200 with TF32 off was 2.1e-6 from these references), so the test holds on every CPU and GPU."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.models.adm import ADMUNet
from extract.models.checkpoints import CheckpointError, load_checkpoint, read_state_dict
from extract.models.config import PRESETS

DATA = Path(__file__).parent / "data"
CONFIGS = ["adm_tiny", "adm_tiny_alt"]


def _reference(name):
    ref = np.load(DATA / f"{name}.npz")
    meta = json.loads(str(ref["meta_json"]))
    model = ADMUNet.from_flags(**meta["args"]).eval()
    load_checkpoint(model, DATA / f"{name}.pt")
    x = torch.from_numpy(ref["in/x"])
    t = torch.from_numpy(ref["in/t"])
    y = torch.from_numpy(ref["in/y"]) if "in/y" in ref else None
    return ref, meta, model, x, t, y


def _rel_err(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(b)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_block_and_output_match_reference(name):
    ref, meta, model, x, t, y = _reference(name)
    blocks = meta["global_blocks"]
    assert [b.module for b in model.blocks] == blocks
    with torch.inference_mode():
        feats = model.features(x, t, blocks, y=y)
        out = model(x, t, y=y)
    for b in blocks:
        assert _rel_err(feats[b], ref[f"act/{b}"]) <= 5e-6, b  # observed 0.9-1.2e-6 in float32
    assert _rel_err(out, ref["act/out"]) <= 5e-6
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    assert list(model.state_dict()) == meta["state_dict_keys"]


@pytest.mark.parametrize("name", CONFIGS)
def test_timestep_embedding_matches_reference(name):
    ref, _, model, x, t, y = _reference(name)
    with torch.inference_mode():
        emb = model.embed(t, y)
    assert _rel_err(emb, ref["act/emb"]) <= 1e-5


def test_legacy_and_new_attention_orders_differ_on_same_weights():
    ref, meta, model, x, t, y = _reference("adm_tiny")
    other = ADMUNet.from_flags(**{**meta["args"], "use_new_attention_order": True}).eval()
    other.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert _rel_err(other(x, t), ref["act/out"]) > 1e-2


def test_features_accept_numbers_and_module_names():
    ref, meta, model, x, t, y = _reference("adm_tiny")
    with torch.inference_mode():
        feats = model.features(x, t, [3, "middle_block", "output_blocks.1"], y=y)
    assert torch.equal(feats[3], model.features(x, t, ["input_blocks.2"])["input_blocks.2"])
    assert _rel_err(feats["middle_block"], ref["act/middle_block"]) <= 1e-4
    with pytest.raises(ValueError, match="out of range"):
        model.features(x, t, [99])
    with pytest.raises(ValueError, match="no block named"):
        model.features(x, t, ["decoder.3"])


def test_unknown_flag_is_an_error_naming_it():
    with pytest.raises(TypeError, match="num_chanels"):
        ADMUNet.from_flags(image_size=32, num_chanels=32)


def test_256_uncond_preset_matches_released_checkpoint_layout():
    with torch.device("meta"):
        model = ADMUNet.from_flags(**PRESETS["256x256_diffusion_uncond"])
    sd = model.state_dict()
    assert len(sd) == 566
    assert sum(p.numel() for p in model.parameters()) == 552_814_086
    assert model.num_blocks == 37
    assert model.block_info(24).module == "output_blocks.4"
    assert (model.block_info(24).channels, model.block_info(24).resolution) == (1024, 16)
    assert (model.block_info(19).module, model.block_info(19).resolution) == ("middle_block", 8)
    assert "input_blocks.3.0.in_layers.2.weight" in sd and "label_emb.weight" not in sd
    assert tuple(sd["out.2.weight"].shape) == (6, 256, 3, 3)


def test_zero_initialised_parameters_are_guided_diffusions_set():
    """guided-diffusion's zero_module layers, read from its own freshly built 256 uncond model."""
    lines = (DATA / "adm256_uncond_zero_init.txt").read_text().splitlines()
    expected = [line for line in lines if line and not line.startswith("#")]
    assert len(expected) == 118
    flags = PRESETS["256x256_diffusion_uncond"]
    with torch.device("meta"):
        full = ADMUNet.from_flags(**flags)
    params = dict(full.named_parameters())
    assert sum(params[name].numel() for name in expected) == 195_154_182
    # The same topology at a quarter of the width has the same parameter names, and fits in memory to look at.
    torch.manual_seed(0)
    narrow = ADMUNet.from_flags(**{**flags, "num_channels": 64})
    zero = [
        name
        for name, p in narrow.named_parameters()
        if not p.detach().any() and not (name.endswith(".bias") and "norm" in _module_kind(narrow, name))
    ]
    assert zero == expected


def _module_kind(model, param_name):
    return type(model.get_submodule(param_name.rsplit(".", 1)[0])).__name__.lower()


@pytest.mark.parametrize("name,keys", [("128x128_diffusion", 493), ("64x64_diffusion", 541)])
def test_other_presets_key_counts(name, keys):
    with torch.device("meta"):
        model = ADMUNet.from_flags(**PRESETS[name])
    assert len(model.state_dict()) == keys


def test_block_24_stops_early_and_equals_full_forward():
    torch.manual_seed(0)
    # the 256 model's topology (levels, res blocks, attention at the same downsample rates), scaled down
    flags = {
        **PRESETS["256x256_diffusion_uncond"],
        "image_size": 64,
        "num_channels": 32,
        "num_head_channels": 16,
        "channel_mult": "1,1,2,2,4,4",
        "attention_resolutions": "8,4,2",
    }
    model = ADMUNet.from_flags(**flags).eval()
    ran = []
    for name, mod in model.named_modules():
        if name.count(".") <= 1 and name:
            mod.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([90, 90])
    captured = {}
    model.output_blocks[4].register_forward_hook(lambda m, i, o: captured.setdefault("b24", o))
    with torch.inference_mode():
        feats = model.features(x, t, [24])
        after_features = list(ran)
        ran.clear()
        model(x, t)
    assert after_features[-1] == "output_blocks.4"
    assert not any(n.startswith("output_blocks.") and int(n.split(".")[1]) > 4 for n in after_features)
    assert "out" not in after_features and "out" in ran
    assert torch.equal(feats[24], captured["b24"])
    # block 24 is ~28.5% of the 256 model's compute
    with torch.device("meta"):
        big = ADMUNet.from_flags(**PRESETS["256x256_diffusion_uncond"])
    share = big.flops_to_block(24) / big.flops_to_block(None)
    assert 0.25 < share < 0.32


def test_shape_mismatch_names_key_and_flag(tmp_path):
    ref, meta, model, *_ = _reference("adm_tiny")
    wrong = ADMUNet.from_flags(**{**meta["args"], "learn_sigma": False})
    with pytest.raises(CheckpointError, match=r"out\.2\.weight.*learn_sigma"):
        load_checkpoint(wrong, DATA / "adm_tiny.pt")
    cond = ADMUNet.from_flags(**{**meta["args"], "class_cond": True})
    with pytest.raises(CheckpointError, match=r"missing.*label_emb.*class_cond"):
        load_checkpoint(cond, DATA / "adm_tiny.pt")


def test_loader_refuses_pickled_objects_and_non_state_dicts(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pt")


def test_safetensors_round_trip(tmp_path):
    from extract.models.checkpoints import save_safetensors

    ref, meta, model, x, t, y = _reference("adm_tiny")
    save_safetensors(model, tmp_path / "m.safetensors")
    again = ADMUNet.from_flags(**meta["args"]).eval()
    load_checkpoint(again, tmp_path / "m.safetensors")
    with torch.inference_mode():
        assert torch.equal(again(x, t), model(x, t))


def test_fused_attention_computes_the_reference_attention():
    """The kernel reduced-precision GPU runs use is the same function as guided-diffusion's QKVAttention."""
    from extract.models.adm import fused_attention, reference_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 32, 50, generator=g) for _ in range(3))
    torch.testing.assert_close(fused_attention(q, k, v), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
