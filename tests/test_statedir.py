"""extract/statedir.py: the one checkpoint format (safetensors + JSON record, atomic, nothing unpickled)."""

import json

import pytest
import torch

from extract.statedir import has_state, join_optimizer_state, load_state, save_state, split_optimizer_state


def test_round_trip_and_only_the_current_tensor_file_is_kept(tmp_path):
    assert not has_state(tmp_path)
    save_state(tmp_path, {"w": torch.ones(2, 3)}, {"epochs_done": 1, "loss": float("nan")}, step=1)
    save_state(tmp_path, {"w": torch.full((2, 3), 2.0)}, {"epochs_done": 2}, step=2)
    assert has_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-0002.safetensors", "state.json"]
    tensors, record = load_state(tmp_path)
    assert torch.equal(tensors["w"], torch.full((2, 3), 2.0)) and record == {"epochs_done": 2}
    save_state(tmp_path / "n", {}, {"loss": float("nan")})
    assert json.loads((tmp_path / "n" / "state.json").read_text())["loss"] is None  # strict JSON
    with pytest.raises(ValueError, match="tensors"):
        save_state(tmp_path, {}, {"tensors": 1})


def test_optimizer_state_survives_the_format(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.2}], momentum=0.9)
    sum(p.sum() for p in params).backward()
    opt.step()
    tensors, record = split_optimizer_state(opt.state_dict())
    save_state(tmp_path, tensors, {"optimizer": record})
    tensors, record = load_state(tmp_path)
    fresh = torch.optim.SGD([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 1.0}], momentum=0.9)
    fresh.load_state_dict(join_optimizer_state(tensors, record["optimizer"]))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"]) for i in a["state"])
