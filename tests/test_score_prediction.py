"""Several heads' logits in one pass, written batch by batch to one ScoreFile per head: the logits the in-memory
prediction gives, and no file left behind when the pass fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probe_data_fixtures import FEAT, FLAT, write_store

from probe.data import ProbeData
from probe.evaluation import predict_many, predict_many_to_files
from probe.fitting import split_logits, split_score_files
from probe.heads import LinearHead, seeded_init
from probe.recipe import Recipe
from probe.stream import FeatureStream


class _FailsOnBatch(torch.nn.Module):
    """A linear head that raises on its `fail_at`-th batch (a pass that breaks half way)."""

    def __init__(self, in_shape, classes: int, fail_at: int) -> None:
        super().__init__()
        self.head = LinearHead(in_shape, classes)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("broken batch")
        return self.head(x)


@pytest.fixture()
def data(tmp_path) -> ProbeData:
    torch.set_num_threads(1)
    return ProbeData.from_store(write_store(tmp_path), [FEAT, FLAT], standardize="none")


def _heads(data: ProbeData) -> dict[str, tuple[torch.nn.Module, str]]:
    heads = {}
    for i, name in enumerate((FEAT, FLAT, FEAT)):
        with seeded_init(i):
            heads[f"{name}#{i}"] = (LinearHead(data.feature_shapes[name], data.num_classes), name)
    return heads


def test_many_heads_to_files_in_one_pass_equal_the_logits_in_memory(data, tmp_path) -> None:
    heads = _heads(data)
    in_memory = predict_many(heads, FeatureStream(data, "test", 7, shuffle=False))
    paths = {k: tmp_path / f"{i}.npy" for i, k in enumerate(heads)}
    for head, _ in heads.values():
        head.train()
    files = predict_many_to_files(heads, FeatureStream(data, "test", 7, shuffle=False), paths)
    assert list(files) == list(heads)
    for key, file in files.items():
        assert file.shape == tuple(in_memory[key].shape) == (len(data.rows("test")), data.num_classes)
        assert np.array_equal(np.load(file.path), in_memory[key].numpy())  # bit for bit
    assert all(head.training for head, _ in heads.values())  # back in their own mode


def test_a_pass_that_fails_leaves_no_score_file_and_restores_the_heads_mode(data, tmp_path) -> None:
    heads = _heads(data)
    heads["broken"] = (_FailsOnBatch(data.feature_shapes[FLAT], data.num_classes, fail_at=3), FLAT)
    paths = {k: tmp_path / f"{i}.npy" for i, k in enumerate(heads)}
    with pytest.raises(RuntimeError, match="broken batch"):
        predict_many_to_files(heads, FeatureStream(data, "test", 7, shuffle=False), paths)
    assert not list(tmp_path.glob("*.npy"))
    assert all(head.training for head, _ in heads.values())
    with pytest.raises(ValueError, match="no score file path"):
        predict_many_to_files(heads, FeatureStream(data, "test", 7, shuffle=False), {})


def test_split_score_files_equal_split_logits_and_clean_up_after_a_failed_split(data, tmp_path) -> None:
    recipe = Recipe.named("diffbank", "sweep", batch_size=16)
    heads = _heads(data)
    arrays = split_logits(data, heads, recipe, "cpu")
    files = split_score_files(data, heads, recipe, "cpu", tmp_path)
    for key in heads:
        assert list(files[key]) == list(arrays[key]) == ["val", "test"]
        for split, file in files[key].items():
            assert np.array_equal(np.load(file.path), arrays[key][split])
    assert len(list(tmp_path.glob(".*_logits.npy"))) == 2 * len(heads)
    for per_split in files.values():
        for file in per_split.values():
            file.remove()
    # val's files are written, then the test pass breaks: neither split's files stay
    val_batches = -(-len(data.rows("val")) // 16)
    heads["broken"] = (_FailsOnBatch(data.feature_shapes[FLAT], data.num_classes, fail_at=val_batches + 2), FLAT)
    with pytest.raises(RuntimeError, match="broken batch"):
        split_score_files(data, heads, recipe, "cpu", tmp_path)
    assert not list(tmp_path.glob(".*_logits.npy"))
