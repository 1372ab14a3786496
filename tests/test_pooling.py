"""Average and token pooling of block maps."""

from __future__ import annotations

import pytest
import torch

from extract.features import FeatureKey, parse_pool, pooled_hw
from extract.pooling import avg_pool, pool, token_pool


def test_avg_pool_is_exact_block_mean_when_divisible():
    x = torch.randn(3, 5, 8, 8)
    out = avg_pool(x, 2)
    assert out.shape == (3, 5, 2, 2)
    ref = x.reshape(3, 5, 2, 4, 2, 4).mean(dim=(3, 5))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(avg_pool(x, 1)[..., 0, 0], x.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)


def test_avg_pool_adaptive_when_not_divisible_and_never_enlarges():
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    out = avg_pool(x, 2)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 0, 0] == x[0, 0, :3, :3].mean()  # adaptive windows overlap at the centre row/column
    assert torch.equal(avg_pool(x, 5), x)  # same size: the map itself, bit for bit
    with pytest.raises(ValueError, match="cannot enlarge"):
        avg_pool(x, 6)


def test_token_pool_caps_at_s():
    small, big = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 32, 32)
    assert torch.equal(token_pool(small, 16), small)
    assert token_pool(big, 16).shape == (2, 4, 16, 16)
    torch.testing.assert_close(token_pool(big, 16), avg_pool(big, 16))


def test_pool_is_per_sample():
    x = torch.randn(6, 3, 16, 16)
    whole = pool(x, "avg4")
    assert torch.equal(whole[2:3], pool(x[2:3], "avg4"))


def test_names_and_shapes():
    assert parse_pool("avg2") == ("avg", 2) and parse_pool("tok16") == ("tok", 16)
    for bad in ("avg0", "max2", "tok", "avg-1"):
        with pytest.raises(ValueError):
            parse_pool(bad)
    assert FeatureKey(90, 24, "tok16").shape(1024, 8) == (1024, 8, 8)
    assert FeatureKey(90, 24, "avg2").shape(1024, 16) == (1024, 2, 2)
    assert pooled_hw("tok", 16, 32) == (16, 16)
    with pytest.raises(ValueError):
        FeatureKey(90, 24, "avg4").shape(8, 2)
    assert pool(torch.randn(1, 2, 4, 4), "tok2").shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="batch, channels"):
        avg_pool(torch.randn(4, 4), 2)
