"""Probe heads: shapes, the paper's architectural details, DifFormer's sharing, and learning a localised signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.evaluation import evaluate
from probe.heads import (
    PRESETS,
    AttentionPoolHead,
    DifFormerHead,
    LinearHead,
    resolve_preset,
    seeded_init,
)
from probe.stream import ArrayStream
from probe.trainer import train


def localized_tokens(n: int, seed: int, num_classes: int = 4, channels: int = 8, side: int = 4):
    """Class information sits in ONE token at a random position, flagged by channel 0.

    A second, unflagged token at another random position carries the negated class vector, so the mean over
    tokens holds no class information at all: mean pooling (and a linear head on the flattened map, whose
    positions are random) stays at chance, while attention can find the flagged token.
    """
    mu = np.linalg.qr(np.random.default_rng(123).normal(size=(channels - 1, channels - 1)))[0][:num_classes] * 3
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.normal(size=(n, channels, side * side)).astype(np.float32)
    order = np.argsort(rng.random((n, side * side)), axis=1)
    rows, signal, anti = np.arange(n), order[:, 0], order[:, 1]
    x[rows, 0, signal] += 4.0
    x[rows, 1:, signal] += mu[y]
    x[rows, 1:, anti] -= mu[y]
    return x.reshape(n, channels, side, side), y


def test_linear_head_flattens_channel_major() -> None:
    head = LinearHead((3, 2, 2), 5)
    x = torch.randn(4, 3, 2, 2)
    expected = x.reshape(4, -1) @ head.linear.weight.T + head.linear.bias
    torch.testing.assert_close(head(x), expected)
    # flat inputs of the same size are accepted; other sizes are refused
    torch.testing.assert_close(head(x.reshape(4, 12)), expected)
    with pytest.raises(ValueError, match="LinearHead expects"):
        head(torch.randn(4, 11))


def test_linear_head_batchnorm_has_no_affine_parameters() -> None:
    head = LinearHead(6, 3, batchnorm=True)
    assert isinstance(head.norm, torch.nn.BatchNorm1d) and head.norm.weight is None
    assert sum(p.numel() for p in head.parameters()) == 6 * 3 + 3


def test_attention_head_matches_paper_details() -> None:
    head = AttentionPoolHead((16, 4, 4), 10, dim=32, heads=4, depth=2)
    assert torch.count_nonzero(head.encoder.cls_token) == 0  # zero-initialised CLS
    assert head.tokenizer.norm.normalized_shape == (16, 4, 4)  # LayerNorm over (C, H, W)
    for block in head.encoder.blocks:
        assert block.attn.qkv.bias is None  # no qkv bias
        assert block.mlp[0].out_features == 4 * 32  # MLP x4
        assert isinstance(block.mlp[1], torch.nn.GELU)
    assert isinstance(head.encoder.norm, torch.nn.Identity)  # the public code has no final norm
    assert not any(isinstance(m, torch.nn.Dropout) for m in head.modules())
    assert head(torch.randn(3, 16, 4, 4)).shape == (3, 10)
    flat = AttentionPoolHead(16, 10, dim=32, heads=4, depth=1)  # an (N, D) feature is one 1x1 token
    assert flat(torch.randn(3, 16)).shape == (3, 10)
    assert AttentionPoolHead(
        (16, 4, 4), 10, dim=32, heads=4, depth=1, final_norm=True
    ).encoder.norm.normalized_shape == (32,)


def test_attention_head_is_permutation_invariant_over_tokens() -> None:
    # No positional embedding: shuffling spatial positions must not change the output.
    with seeded_init(0):
        head = AttentionPoolHead((5, 3, 3), 4, **PRESETS["tiny"]).eval()
    x = torch.randn(2, 5, 3, 3)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    shuffled = x.flatten(2)[:, :, perm].reshape(2, 5, 3, 3)
    torch.testing.assert_close(head(x), head(shuffled), rtol=1e-5, atol=1e-5)


def test_learned_positions_tell_token_places_apart() -> None:
    # With an embedding per place, the same tokens at other places give other outputs; the embedding belongs
    # to the tokenizer (one per block in DifFormer), and heads without it keep the weights they had.
    with seeded_init(0):
        plain = AttentionPoolHead((5, 3, 3), 4, **PRESETS["tiny"])
    with seeded_init(0):
        placed = AttentionPoolHead((5, 3, 3), 4, **PRESETS["tiny"], positions="learned").eval()
    assert placed.tokenizer.pos is not None and placed.tokenizer.pos.shape == (1, 9, 64)
    assert 0.01 < float(placed.tokenizer.pos.std()) < 0.03
    torch.testing.assert_close(plain.tokenizer.proj.weight, placed.tokenizer.proj.weight)
    x = torch.randn(2, 5, 3, 3)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    shuffled = x.flatten(2)[:, :, perm].reshape(2, 5, 3, 3)
    assert (placed(x) - placed(shuffled)).abs().max() > 1e-3
    fusion = DifFormerHead({10: (5, 3, 3), 12: (5, 2, 2)}, [5, 10], 4, dim=16, heads=2, depth=1, positions="learned")
    assert [m.pos.shape for m in fusion.tokenizers.values()] == [(1, 9, 16), (1, 4, 16)]
    with pytest.raises(ValueError, match="positions must be one of 'none', 'learned'"):
        AttentionPoolHead((5, 3, 3), 4, **PRESETS["tiny"], positions="sinusoidal")


def test_presets_and_bad_sizes() -> None:
    assert PRESETS["paper"] == dict(dim=1024, heads=8, depth=2)
    assert resolve_preset("tiny", dim=32) == dict(dim=32, heads=4, depth=1)
    with pytest.raises(ValueError, match="preset"):
        resolve_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        AttentionPoolHead((4, 2, 2), 3, dim=30, heads=4, depth=1)
    with pytest.raises(ValueError, match="num_classes"):
        LinearHead(4, 0)
    with pytest.raises(ValueError, match="in_shape"):
        AttentionPoolHead((4, 2), 3, dim=8, heads=2, depth=1)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    with seeded_init(3):
        a = AttentionPoolHead((4, 2, 2), 3, **PRESETS["tiny"])
    assert torch.equal(torch.rand(1), expected_next)
    with seeded_init(3):
        b = AttentionPoolHead((4, 2, 2), 3, **PRESETS["tiny"])
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def _difformer_inputs(n: int = 3):
    shapes = {19: (6, 2, 2), 24: (4, 4, 4), 30: (3, 4, 4)}
    return shapes, {(t, b): torch.randn(n, *s) for t in (90, 150) for b, s in shapes.items()}


def test_difformer_shares_tokenizers_and_transformer_across_timesteps() -> None:
    shapes, inputs = _difformer_inputs()
    one_t = DifFormerHead(shapes, [90], 5, dim=16, heads=2, depth=1)
    three_t = DifFormerHead(shapes, [90, 150, 300], 5, dim=16, heads=2, depth=1)
    body = lambda h: sum(p.numel() for n, p in h.named_parameters() if not n.startswith("classifier"))  # noqa: E731
    assert body(one_t) == body(three_t)  # nothing but the classifier grows with n_t
    assert three_t.classifier.in_features == 3 * 16
    head = DifFormerHead(shapes, [90, 150], 5, dim=16, heads=2, depth=1).eval()
    out = head(inputs)
    assert out.shape == (3, 5)
    # Reference computation: one transformer run per t on the concatenated block tokens.
    cls = []
    for t in (90, 150):
        tokens = torch.cat([head.tokenizers[f"b{b}"](inputs[(t, b)]) for b in shapes], dim=1)
        assert tokens.shape[1] == 4 + 16 + 16
        cls.append(head.encoder(tokens))
    torch.testing.assert_close(out, head.classifier(torch.cat(cls, dim=1)), rtol=1e-5, atol=1e-5)


def test_difformer_with_one_block_and_timestep_is_the_attention_head() -> None:
    with seeded_init(0):
        attention = AttentionPoolHead((4, 3, 3), 6, dim=16, heads=2, depth=2)
    fusion = DifFormerHead({24: (4, 3, 3)}, [90], 6, dim=16, heads=2, depth=2)
    state = {
        ("tokenizers.b24." + k[len("tokenizer.") :] if k.startswith("tokenizer.") else k): v
        for k, v in attention.state_dict().items()
    }
    fusion.load_state_dict(state)
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(fusion({(90, 24): x}), attention(x))


def test_difformer_rejects_missing_or_extra_inputs() -> None:
    shapes, inputs = _difformer_inputs()
    head = DifFormerHead(shapes, [90, 150], 5, dim=16, heads=2, depth=1)
    del inputs[(150, 24)]
    with pytest.raises(ValueError, match="missing"):
        head(inputs)
    with pytest.raises(ValueError, match="timesteps"):
        DifFormerHead(shapes, [90, 90], 5, dim=16, heads=2, depth=1)


def test_attention_learns_a_localised_token_that_mean_pooling_cannot_see() -> None:
    torch.set_num_threads(1)
    x_train, y_train = localized_tokens(1024, seed=0)
    x_test, y_test = localized_tokens(1024, seed=1)
    train_stream = ArrayStream({"x": x_train}, y_train, batch_size=64, seed=0)
    test_stream = ArrayStream({"x": x_test}, y_test, batch_size=512, shuffle=False)
    with seeded_init(0):
        head = AttentionPoolHead((8, 4, 4), 4, dim=32, heads=2, depth=1)
    chance_before = evaluate({"h": head}, {"h": "x"}, test_stream)["h"][1]
    assert chance_before < 0.35
    train(head, train_stream, lr=0.05, momentum=0.9, epochs=10, progress=False)
    assert evaluate({"h": head}, {"h": "x"}, test_stream)["h"][1] >= 0.8

    # The same budget on mean-pooled tokens stays at chance: the information is only reachable by attending.
    pooled = ArrayStream({"x": x_train.mean((2, 3))}, y_train, batch_size=64, seed=0)
    pooled_test = ArrayStream({"x": x_test.mean((2, 3))}, y_test, batch_size=512, shuffle=False)
    with seeded_init(0):
        linear = LinearHead(8, 4)
    train(linear, pooled, lr=0.1, momentum=0.9, epochs=10, progress=False)
    assert evaluate({"h": linear}, {"h": "x"}, pooled_test)["h"][1] < 0.35
