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


def _splitmix_reference(key: int, j: int) -> float:
    """counter_noise's element j, in Python's unbounded integers and float64."""
    import math

    mask = (1 << 64) - 1
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    u1, u2 = ((z >> 40) + 1) * 2.0**-24, ((z >> 16) & 0xFFFFFF) * 2.0**-24
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


def test_counter_noise_matches_its_definition_and_is_batch_independent():
    from extract.diffusion import counter_noise, noise_seed

    shape = (3, 16, 16)
    full = counter_noise(5, list(range(6)), 90, 1, shape)
    flat = full.reshape(6, -1)
    for i, j in [(0, 0), (4, 1), (2, 767), (5, 300)]:  # int64 wrap-around and logical shifts, checked
        assert flat[i, j].item() == pytest.approx(_splitmix_reference(noise_seed(5, i, 90, 1), j), abs=2e-6)
    part = counter_noise(5, [4, 2], 90, 1, shape)
    assert torch.equal(part[0], full[4]) and torch.equal(part[1], full[2])
    assert not torch.equal(full[0], counter_noise(5, [0], 90, 0, shape)[0])  # draw
    assert not torch.equal(full[0], counter_noise(5, [0], 91, 1, shape)[0])  # timestep
    big = counter_noise(0, list(range(32)), 10, 0, (3, 32, 32)).flatten().double()
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    assert abs((big > 1.96).double().mean().item() - 0.025) < 0.003  # a normal tail, not a uniform


def test_noise_for_dispatches_every_spec_rule():
    from extract.diffusion import counter_noise, noise_for
    from extract.spec.schema import NOISE_RULES

    for rule in NOISE_RULES:
        assert noise_for(rule, 1, [0, 3], 5, 0, (3, 4, 4)).shape == (2, 3, 4, 4)
    assert torch.equal(noise_for("generator", 1, [3], 5, 0, (3, 4, 4)), seeded_noise(1, [3], 5, 0, (3, 4, 4)))
    assert torch.equal(noise_for("counter", 1, [3], 5, 0, (3, 4, 4)), counter_noise(1, [3], 5, 0, (3, 4, 4)))
    with pytest.raises(ValueError, match="unknown noise rule 'philox'"):
        noise_for("philox", 1, [0], 5, 0, (3, 4, 4))


def test_q_sample_with_one_int_timestep_equals_the_per_sample_path():
    s = NoiseSchedule.from_flags("linear", 1000)
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.equal(s.q_sample(x0, 150, noise), s.q_sample(x0, torch.full((3,), 150), noise))
