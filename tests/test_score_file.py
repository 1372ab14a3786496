"""Logits written block by block to disk (ScoreFile): scored and saved as if they had been held in memory."""

from __future__ import annotations

import numpy as np
import pytest

from probe import logits as logits_module
from probe.logits import ScoreFile, SplitScores, read_logits, remove_stale_score_files, score_file_path, write_logits
from probe.metrics import classification_metrics


def _scores(rows: int = 1000, classes: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, classes)).astype(np.float32)
    x[3, 5] = -np.inf  # a class absent from train, as logistic scores mark it
    return x, rng.integers(0, classes, rows)


def _file(tmp_path, x: np.ndarray, batch: int = 97) -> ScoreFile:
    f = ScoreFile(tmp_path / "s.npy", *x.shape)
    for lo in range(0, len(x), batch):
        f.append(x[lo : lo + batch])
    f.close()
    return f


def test_score_file_is_a_npy_and_reads_back_in_blocks(tmp_path, monkeypatch):
    x, _ = _scores()
    monkeypatch.setattr(logits_module, "SCORE_BLOCK_VALUES", 12 * 64)  # blocks of 64 rows
    f = _file(tmp_path, x)
    assert np.array_equal(np.load(f.path), x)
    blocks = list(f.blocks())
    assert [len(b) for b in blocks][:2] == [64, 64] and len(blocks) == 16
    assert np.array_equal(np.concatenate(blocks), x)


def test_score_file_refuses_wrong_blocks_and_missing_rows(tmp_path):
    f = ScoreFile(tmp_path / "s.npy", 10, 3)
    with pytest.raises(ValueError, match="does not continue"):
        f.append(np.zeros((2, 4), np.float32))
    f.append(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="4 of 10 rows"):
        f.close()
    f.remove()
    assert not f.path.exists()


def test_metrics_from_a_score_file_equal_those_from_the_array(tmp_path, monkeypatch):
    x, y = _scores()
    f = _file(tmp_path, x)
    monkeypatch.setattr(logits_module, "SCORE_BLOCK_VALUES", 12 * 100)
    from_file = classification_metrics(y, f, num_classes=12)
    assert from_file == classification_metrics(y, x, num_classes=12)
    assert 0 < from_file["top5"] < 1


def test_logits_npz_from_a_score_file_equals_the_one_from_the_array(tmp_path):
    x, y = _scores()
    rows = np.arange(len(x)) * 3
    f = _file(tmp_path, x)
    write_logits(tmp_path / "a.npz", {"test": SplitScores(x, rows, y, None)}, "fp")
    write_logits(tmp_path / "b.npz", {"test": SplitScores(f, rows, y, None)}, "fp")
    (a, fa), (b, fb) = read_logits(tmp_path / "a.npz"), read_logits(tmp_path / "b.npz")
    assert fa == fb == "fp"
    assert np.array_equal(a["test"].logits, x) and np.array_equal(b["test"].logits, x)
    assert np.array_equal(b["test"].rows, rows) and np.array_equal(b["test"].labels, y)
    assert np.array_equal(SplitScores(f, rows, y, None).correct, a["test"].correct)
    with np.load(tmp_path / "b.npz") as z:  # the layout np.savez writes: one .npy member per array
        assert sorted(z.files) == ["store_fingerprint", "test_labels", "test_logits", "test_rows"]


def test_stale_score_files_are_removed_and_nothing_else(tmp_path):
    stale = [score_file_path(tmp_path, i, split) for i in (0, 12) for split in ("val", "test")]
    kept = [tmp_path / "logits.npz", tmp_path / ".0.val_logits.npy.bak", tmp_path / "0.val_logits.npy"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_score_files(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
