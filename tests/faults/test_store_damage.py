"""A damaged store never reads as fill values: every kind of chunk, deleted, truncated or with a flipped
byte, gives an error naming the array and the chunk, from reads, batches, export, xarray and verify.

case (chunk kind x damage)                         -> behaviour                                  -> test
feature shard deleted / truncated / byte flipped   -> read, iter_batches, export, to_xarray and
                                                      verify --full name array, shard, rows      -> test_damaged_chunk_is_named[feature shard-*]
label / id / valid / error chunk, same damage      -> the sample property and verify name it     -> test_damaged_chunk_is_named[label-*] ...
split chunk, same damage                           -> `splits` and verify name it                -> test_damaged_chunk_is_named[split-*]
progress done / stats chunk, same damage           -> reads (done) and verify name it            -> test_damaged_chunk_is_named[done-*|stats-*]
deleted label or feature shard                     -> export, iter_batches, to_xarray refuse     -> test_every_read_path_refuses_a_deleted_chunk
`diffbank store verify` without --full             -> exit 1, the chunk named                    -> test_cli_verify_names_a_deleted_label_chunk
`diffbank probe linear`, deleted label or shard     -> exit 1, one line naming array and chunk     -> test_cli_probe_refuses_a_deleted_chunk
`diffbank store export`, flipped valid byte        -> exit 1, one line naming array and chunk     -> test_cli_export_of_a_damaged_store_is_one_named_line
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_store_verify import NAME, N, write_store

from extract.store import StoreError, export_hdf5, open_store, verify

from .conftest import cli

# chunk kind -> (stored object, array named in the error, what reads it, whether verify must read data)
KINDS = {
    "feature shard": (f"features/{NAME}/c/1/0/0/0", NAME, lambda fs: fs.read(NAME), True),
    "label": ("samples/label/c/0", "samples/label", lambda fs: fs.labels, False),
    "id": ("samples/id/c/0", "samples/id", lambda fs: fs.sample_ids, False),
    "valid": ("samples/valid/c/1", "samples/valid", lambda fs: fs.valid, False),
    "error": ("samples/error/c/1", "samples/error", lambda fs: fs.failures, False),
    "split": ("splits/train/c/0", "splits/train", lambda fs: fs.splits, False),
    "done": ("_progress/done/c/1/0", "_progress/done", lambda fs: fs.read(NAME), False),
    "stats": ("_progress/stats/c/1/0/0", "_progress/stats", None, False),
}


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-6])


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


DAMAGE = {"deleted": _delete, "truncated": _truncate, "flipped": _flip}


@pytest.fixture()
def store(tmp_path) -> Path:
    return write_store(tmp_path / "s.zarr")


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_chunk_is_named(store, kind, damage):
    key, array, reads, data = KINDS[kind]
    assert verify(store, full_scan=data).ok
    DAMAGE[damage](store / key)
    report = verify(store, full_scan=data)
    assert not report.ok and any(array in p for p in report.problems), report
    if reads is not None:
        with pytest.raises(StoreError, match=array):
            reads(open_store(store))


@pytest.mark.parametrize("kind", ["feature shard", "label"])
def test_every_read_path_refuses_a_deleted_chunk(store, tmp_path, kind):
    key, array, _, _ = KINDS[kind]
    (store / key).unlink()
    fs = open_store(store)
    with pytest.raises(StoreError, match=array):  # a probe reads labels beside its batches
        batches = list(fs.iter_batches(NAME, 5))
        assert len(batches) == 5 and fs.labels.shape == (N,)
    with pytest.raises(StoreError, match=array):
        export_hdf5(open_store(store), tmp_path / "out.h5")
    with pytest.raises(StoreError, match=array):
        export_hdf5(open_store(store), tmp_path / "out16.h5", keep_dtype=True)
    pytest.importorskip("xarray")
    with pytest.raises(StoreError, match=array):
        open_store(store).to_xarray(NAME)


def test_cli_verify_names_a_deleted_label_chunk(store):
    (store / "samples/label/c/0").unlink()
    result = cli("store", "verify", str(store))
    assert result.exit_code == 1 and "samples/label: chunk c/0 (rows 0-23) is absent" in result.output, result.output


def test_cli_export_of_a_damaged_store_is_one_named_line(store, tmp_path):
    raw = bytearray((store / "samples/valid/c/1").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (store / "samples/valid/c/1").write_bytes(bytes(raw))
    result = cli("store", "export", str(store), str(tmp_path / "out.h5"))
    assert result.exit_code == 1 and "samples/valid: chunk c/1 (rows 8-15) fails its checksum" in result.output
    assert "unexpected" not in result.output, result.output


@pytest.mark.parametrize("kind", ["feature shard", "label"])
def test_cli_probe_refuses_a_deleted_chunk(store, tmp_path, kind):
    key, array, _, _ = KINDS[kind]
    (store / key).unlink()
    result = cli("probe", "linear", str(store), "--out", str(tmp_path / "probe"))
    last = result.output.splitlines()[-1]  # after the announced defaults (feature, recipe, split carve)
    assert result.exit_code == 1 and last.startswith("error: ") and array in last, result.output
    assert "absent" in last and "unexpected" not in result.output
