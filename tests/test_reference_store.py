"""Extraction stays byte-identical to a reference store.

tests/data/reference/store.zarr was written by `diffbank extract tests/data/reference/spec.yaml` (one
torch thread). It was first written before the refactor of issue 8 and regenerated once, deliberately,
for store format 2 (issue 12: every chunk ends in a crc32c checksum), which changes the chunk files
but not one decoded value: tests/data/store_v1.zarr keeps the format-1 original, and the decoded arrays
of a fresh store must equal both. A store written from the same spec today must hold the same chunk
files byte for byte (Blosc-LZ4 is deterministic) and the same metadata apart from what records when and
with which library versions it was written. (Its provenance gained `compute.threads: 1` when the thread
count became a recorded setting; it was written with one thread.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
# What says when, and with which installed versions, a store was written: not part of its content.
VOLATILE_ATTRS = {"created", "finalized", "versions", "diffbank_version"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _metadata(doc: dict) -> dict:
    """A zarr.json without the volatile root attributes and the consolidated copy (compared separately)."""
    doc = json.loads(json.dumps(doc))
    doc.pop("consolidated_metadata", None)
    attrs = doc.get("attributes", {})
    for key in VOLATILE_ATTRS:
        attrs.pop(key, None)
    return doc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "store.zarr"
    from diffbank.cli import main

    result = CliRunner().invoke(main, ["extract", str(REFERENCE / "spec.yaml"), "--store", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("reference", [REFERENCE / "store.zarr", REFERENCE.parent / "store_v1.zarr"])
def test_decoded_arrays_are_bit_identical(fresh, reference):
    ref = zarr.open_group(str(reference), mode="r", use_consolidated=False)
    new = zarr.open_group(str(fresh), mode="r", use_consolidated=False)
    for group in ("features", "samples", "splits", "_progress"):
        names = sorted(n for n, _ in ref[group].arrays())
        assert sorted(n for n, _ in new[group].arrays()) == names, group
        for name in names:
            a, b = np.asarray(ref[group][name][:]), np.asarray(new[group][name][:])
            assert a.dtype == b.dtype and a.shape == b.shape, f"{group}/{name}"
            if a.dtype.kind == "f":
                assert a.tobytes() == b.tobytes(), f"{group}/{name}"
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{group}/{name}")


def test_chunk_files_are_byte_identical(fresh):
    ref, new = _files(REFERENCE / "store.zarr"), _files(fresh)
    assert sorted(ref) == sorted(new)
    chunks = [k for k in ref if not k.endswith("zarr.json")]
    assert chunks
    for key in chunks:
        assert ref[key] == new[key], key


def test_metadata_is_identical_apart_from_time_and_versions(fresh):
    ref, new = _files(REFERENCE / "store.zarr"), _files(fresh)
    for key in (k for k in ref if k.endswith("zarr.json")):
        a, b = json.loads(ref[key]), json.loads(new[key])
        assert _metadata(a) == _metadata(b), key
    root = json.loads(new["zarr.json"])
    assert set(root["attributes"]) >= VOLATILE_ATTRS
    consolidated = root["consolidated_metadata"]["metadata"]
    assert consolidated == json.loads(ref["zarr.json"])["consolidated_metadata"]["metadata"]
