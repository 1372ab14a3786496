import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.diffusion import NoiseSchedule, seeded_noise

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["adm_tiny", "adm_tiny_alt"])
def test_schedule_and_q_sample_match_reference(name):
    ref = np.load(DATA / f"{name}.npz")
    args = json.loads(str(ref["meta_json"]))["args"]
    sched = NoiseSchedule.from_flags(args["noise_schedule"], args["diffusion_steps"])
    for key, ours in [
        ("betas", sched.betas),
        ("alphas_cumprod", sched.alphas_cumprod),
        ("sqrt_alphas_cumprod", sched.sqrt_alphas_cumprod),
        ("sqrt_one_minus_alphas_cumprod", sched.sqrt_one_minus_alphas_cumprod),
    ]:
        np.testing.assert_allclose(ours, ref[f"sched/{key}"], rtol=1e-6, atol=0)
    x0 = torch.from_numpy(ref["q/x0"]).expand(len(ref["q/t"]), -1, -1, -1)
    noise = torch.from_numpy(ref["q/noise"]).expand_as(x0)
    xt = sched.q_sample(x0, torch.from_numpy(ref["q/t"]), noise)
    np.testing.assert_allclose(xt.numpy(), ref["q/x_t"], rtol=1e-6, atol=1e-6)


def test_linear_reference_values():
    s = NoiseSchedule.from_flags("linear", 1000)
    for t, v in [(50, 0.98486115), (150, 0.88650269), (250, 0.72209628), (500, 0.27892052)]:
        assert abs(s.sqrt_alphas_cumprod[t] - v) < 1e-7
    assert abs(s.alphas_cumprod[0] - 0.9999) < 1e-12


def test_timestep_outside_schedule_is_an_error():
    s = NoiseSchedule.from_flags("linear", 1000)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\[1000\].*outside \[0, 1000\)"):
        s.q_sample(x, torch.tensor([5, 1000]), x)
    with pytest.raises(ValueError, match="outside"):
        s.q_sample(x, -1, x)
    with pytest.raises(ValueError, match="unknown noise_schedule"):
        NoiseSchedule.from_flags("sigmoid")


def test_seeded_noise_depends_only_on_key():
    a = seeded_noise(7, [0, 1, 2, 3], timestep=90, draw=0, shape=(3, 8, 8))
    b = seeded_noise(7, [3, 1], timestep=90, draw=0, shape=(3, 8, 8))
    assert torch.equal(a[3], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], seeded_noise(7, [0], 150, 0, (3, 8, 8))[0])
    assert not torch.equal(a[0], seeded_noise(7, [0], 90, 1, (3, 8, 8))[0])
    assert not torch.equal(a[0], seeded_noise(8, [0], 90, 0, (3, 8, 8))[0])
