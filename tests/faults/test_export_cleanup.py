"""A failed `store export` leaves no file behind: it writes under a temporary name of its own and removes
it on failure; only a complete export carries the final name."""

from __future__ import annotations

import pytest

from extract.store import export_hdf5
from extract.store.reader import FeatureStore

from .conftest import cli


@pytest.fixture(scope="module")
def store(synthetic_store) -> str:
    return synthetic_store(n=48, k=3, dim=4, seed=0, n_train=36, class_names=["a", "b", "c"])


def test_a_failed_export_leaves_nothing(tmp_path, store, monkeypatch):
    calls = []

    def failing_read(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:  # fail midway, with a file half written
            raise OSError(5, "Input/output error")
        return real_read(self, *a, **k)

    real_read = FeatureStore.read
    monkeypatch.setattr(FeatureStore, "read", failing_read)
    result = cli("store", "export", store, str(tmp_path / "out.h5"))
    assert result.exit_code == 1 and "Input/output error" in result.output, result.output
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_nothing_and_keeps_an_older_file(tmp_path, store, monkeypatch):
    out = tmp_path / "out.h5"
    out.write_bytes(b"an earlier export")

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_hdf5(store, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"] and out.read_bytes() == b"an earlier export"


def test_a_complete_export_carries_only_the_final_name(tmp_path, store):
    path = export_hdf5(store, tmp_path / "out.h5", compression=None)
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"] and path == tmp_path / "out.h5"
