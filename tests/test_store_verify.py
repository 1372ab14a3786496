"""`verify --full` names each kind of damage, passes a clean store, and reads format-1 stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from extract.store import open_store, save_features, verify
from extract.store.shards import ChecksumError

N, SHARD, CHUNK = 24, 8, 4
NAME = "t090_b24_avg2"
OLD_STORE = Path(__file__).resolve().parent / "data" / "store_v1.zarr"


def write_store(path: Path) -> Path:
    """Two features in 3 shards of two 4-row chunks, labels and two splits (also the damage battery's store)."""
    rng = np.random.default_rng(0)
    save_features(
        path,
        {NAME: rng.standard_normal((N, 8, 2, 2)).astype(np.float16), "t010_b02_avg1": rng.random((N, 3, 1, 1))},
        rng.integers(0, 3, N),
        {"train": np.arange(16), "test": np.arange(16, N)},
        shard_rows=SHARD,
        chunk_rows=CHUNK,
    )
    return path


@pytest.fixture()
def store(tmp_path) -> Path:
    return write_store(tmp_path / "s.zarr")


def _shard(path: Path, unit: int, name: str = NAME) -> Path:
    return path / "features" / name / "c" / str(unit) / "0" / "0" / "0"


def _problems(path: Path) -> list[str]:
    report = verify(path, full_scan=True)
    assert report.ok is (not report.problems)
    return report.problems


def test_clean_store_passes_with_checksums(store):
    report = verify(store, full_scan=True)
    assert report.ok and report.checked["checksums"] and not report.notes, report


def test_flipped_byte_fails_its_checksum(store):
    shard = _shard(store, 1)
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0x01  # inside the first inner chunk's compressed bytes
    shard.write_bytes(bytes(raw))
    problems = _problems(store)
    assert len(problems) == 1 and "unit 1 (rows 8-15)" in problems[0] and "rows 8-11 fails its checksum" in problems[0]
    with pytest.raises(ChecksumError, match="crc32c"):
        open_store(store).read(NAME, slice(8, 12))


def test_missing_chunk_in_a_shard(store):
    shard = _shard(store, 0)
    raw = bytearray(shard.read_bytes())
    n = SHARD // CHUNK
    index = np.frombuffer(bytes(raw[-(16 * n + 4) : -4]), dtype="<u8").reshape(n, 2).copy()
    index[1] = np.iinfo(np.uint64).max  # the index says chunk 1 was never written
    body = index.tobytes()
    raw[-(16 * n + 4) :] = body + np.uint32(google_crc32c.value(body)).tobytes()
    shard.write_bytes(bytes(raw))
    problems = _problems(store)
    assert len(problems) == 1 and "chunk 1 (rows 4-7) is missing" in problems[0], problems


def test_truncated_shard(store):
    shard = _shard(store, 2)
    shard.write_bytes(shard.read_bytes()[:-30])
    problems = _problems(store)
    assert len(problems) == 1 and "unit 2 (rows 16-23)" in problems[0] and "truncated" in problems[0], problems


def test_marker_set_but_data_absent(store):
    _shard(store, 1).unlink()
    problems = _problems(store)
    assert len(problems) == 1 and "unit 1 (rows 8-15): marked done but its data is absent" in problems[0], problems


def test_unrecorded_non_finite_values(store):
    arr = zarr.open_group(str(store), mode="r+", use_consolidated=False)["features"][NAME]
    arr[3, 0, 0, 0] = np.nan
    arr[9, 1, 0, 0] = np.inf
    problems = _problems(store)
    assert problems == [f"{NAME}: holds 1 infs and 1 NaNs in units marked done; the extraction recorded 0 and 0"]


def test_fingerprint_mismatch(store):
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root.attrs.update({"fingerprint": "0" * 64})
    problems = _problems(store)
    assert len(problems) == 1 and "does not match the stored spec" in problems[0], problems


def test_feature_list_differs_from_arrays_on_disk(store):
    shutil.rmtree(store / "features" / "t010_b02_avg1")
    problems = _problems(store)
    assert problems == [
        "the recorded feature list differs from the arrays on disk: recorded but absent: ['t010_b02_avg1']"
    ]


def test_format_1_store_reads_and_verify_says_it_predates_checksums(tmp_path):
    old = tmp_path / "old.zarr"
    shutil.copytree(OLD_STORE, old)
    fs = open_store(old)
    assert fs.attrs["format_version"] == 1
    for name in fs.feature_names(None):
        expect = np.asarray(zarr.open_array(str(old / "features" / name), mode="r")[:], dtype=np.float32)
        np.testing.assert_array_equal(fs.read(name), expect)
        rows = np.array([5, 0, 3, 3])
        np.testing.assert_array_equal(fs.read(name, rows), expect[rows])
    report = verify(old, full_scan=True)
    assert report.ok and not report.checked["checksums"], report
    assert any("predates chunk checksums" in n for n in report.notes), report.notes


def test_the_shard_index_is_read_from_public_codec_metadata_and_one_zarr_internal(store):
    """The index size comes from the array's index codecs (bytes + crc32c: 16 bytes a chunk + 4), and the
    store's bytes come through `zarr.core.sync.sync`, the one zarr internal it uses: checked on zarr 3.1.0
    and 3.1.6. A zarr that drops or changes it fails here first."""
    from zarr.core.sync import sync

    from extract.store.shards import object_bytes, shard_index_format, shard_key

    arr = zarr.open_group(store, mode="r")["features"][NAME]
    fmt = shard_index_format(arr)
    assert (fmt.chunks, fmt.checksum, fmt.nbytes) == (SHARD // CHUNK, True, 16 * (SHARD // CHUNK) + 4)
    raw = _shard(store, 1).read_bytes()
    assert object_bytes(arr, shard_key(arr, 1)).tobytes() == raw and callable(sync)
    at = 0 if fmt.at_start else len(raw) - fmt.nbytes
    table = fmt.decode(np.frombuffer(raw[at : at + fmt.nbytes], np.uint8), "index")
    body = fmt.nbytes if fmt.at_start else 0
    assert table[0, 0] == body and int(table[-1].sum()) == body + len(raw) - fmt.nbytes  # chunks fill the rest
    with pytest.raises(ChecksumError, match="index"):
        fmt.decode(np.frombuffer(bytes(raw[at : at + fmt.nbytes - 1]) + b"\x00", np.uint8), "index")
