"""probe/baselines.py: logistic C sweep and weighted cosine kNN learn; chunked kNN equals brute force."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probe.baselines import check_min_samples, knn_neighbours, knn_sweep, knn_vote, logistic_sweep
from probe.errors import ProbeDataError


def _gaussians(seed, n_per_class=60, k=5, d=12, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 2.0
    y = np.repeat(np.arange(k), n_per_class)
    x = (centres[y] + rng.normal(size=(len(y), d)) * spread).astype(np.float32)
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def test_logistic_sweep_learns_and_selects_on_validation():
    x, y = _gaussians(0, n_per_class=80)
    tr, va, te = slice(0, 240), slice(240, 320), slice(320, 400)
    out, scores = logistic_sweep(x[tr], y[tr], x[va], y[va], x[te], y[te], num_classes=5, cs=[1e-6, 1e-2, 1.0, 100.0])
    assert (
        scores["test"].shape == (80, 5) and np.mean(scores["test"].argmax(1) == y[te]) == out["metrics"]["test"]["top1"]
    )
    assert out["metrics"]["test"]["top1"] > 0.9  # chance is 0.2
    by_c = {r["C"]: r["val_top1"] for r in out["sweep"]}
    assert by_c[1e-6] < 0.5 < by_c[1.0]  # near-zero weights cannot separate the classes
    assert out["selected"]["val_top1"] == max(by_c.values())
    assert out["selected"]["C"] != 1e-6 and out["refit_on"] == "train+val"
    assert out["metrics"]["test"]["top5"] == 1.0 and len(out["metrics"]["test"]["per_class_accuracy"]) == 5


def test_knn_learns_and_selects_k_on_validation():
    x, y = _gaussians(2, n_per_class=80)
    bank = [(torch.from_numpy(x[i : i + 50]), torch.from_numpy(y[i : i + 50])) for i in range(0, 240, 50)]
    out, scores = knn_sweep(
        iter(bank),
        240,
        torch.from_numpy(x[240:320]),
        y[240:320],
        torch.from_numpy(x[320:]),
        y[320:],
        num_classes=5,
        ks=[1, 10, 20],
    )
    assert out["metrics"]["test"]["top1"] > 0.9
    assert np.mean(scores["val"].argmax(1) == y[240:320]) == out["selected"]["val_top1"]
    best = max(out["sweep"], key=lambda r: (r["val_top1"], -r["k"]))
    assert out["selected"]["k"] == best["k"]
    with pytest.raises(ProbeDataError, match=r"k=300 .*needs at least 300 samples but only 240"):
        knn_sweep(
            iter(bank),
            240,
            torch.zeros(2, 12),
            np.zeros(2),
            torch.zeros(2, 12),
            np.zeros(2),
            num_classes=5,
            ks=[10, 300],
        )


def test_chunked_knn_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    bank_x = torch.randn(301, 16, generator=gen)
    bank_y = torch.randint(0, 7, (301,), generator=gen)
    queries = torch.randn(53, 16, generator=gen)
    chunks = [(bank_x[i : i + 37], bank_y[i : i + 37]) for i in range(0, 301, 37)]
    sims, labs, idx = knn_neighbours(iter(chunks), queries, 20, query_chunk=7)
    full = F.normalize(queries, dim=1) @ F.normalize(bank_x, dim=1).T  # the N x N reference
    ref_sims, ref_idx = full.topk(20, dim=1)
    torch.testing.assert_close(sims, ref_sims, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, ref_idx) and torch.equal(labs, bank_y[ref_idx])
    scores = knn_vote(sims, labs, 10, 7, temperature=0.07)
    ref = np.zeros((53, 7))
    rows = np.repeat(np.arange(53), 10)
    np.add.at(
        ref, (rows, bank_y[ref_idx[:, :10]].numpy().ravel()), np.exp(ref_sims[:, :10].double().numpy().ravel() / 0.07)
    )
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-4)


def test_error_too_few_samples_for_k():
    with pytest.raises(ProbeDataError, match="kNN with k=200 needs at least 200 samples but only 81"):
        check_min_samples(81, 200, "kNN with k=200")
