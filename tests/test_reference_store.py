"""Extraction stays byte-identical to a reference store.

tests/data/reference/store.zarr was written by `diffbank extract tests/data/reference/spec.yaml` (one
torch thread). It was first written before the refactor of issue 8 and regenerated once, deliberately,
for store format 2 (issue 12: every chunk ends in a crc32c checksum), which changes the chunk files
but not one decoded value: tests/data/store_v1.zarr keeps the format-1 original, and the decoded arrays
of a fresh store must equal both. Format 3 (issue 12: each feature's dimensions carry its name, so xarray
opens the store) changed only the zarr.json files, regenerated deliberately; tests/data/store_v2.zarr keeps
the format-2 store. Format 4 (every chunk stored, fill values included, so an absent chunk is damage) added
the chunks of fill values, here the error strings of units without failures, and changed no other chunk
file; regenerated deliberately, tests/data/store_v3.zarr keeps the format-3 store. A store written from the same spec today must hold the same chunk
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


OLD_STORES = [REFERENCE.parent / f"store_v{v}.zarr" for v in (1, 2, 3)]


@pytest.mark.parametrize("reference", [REFERENCE / "store.zarr", *OLD_STORES])
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
    # format 3 renamed dimensions and changed no chunk; format 4 stores the chunks of fill values too
    # (here the error strings of units without failures) and changed no other chunk
    for old in ("store_v2.zarr", "store_v3.zarr"):
        kept = {k: v for k, v in _files(REFERENCE.parent / old).items() if not k.endswith("zarr.json")}
        assert kept == {k: ref[k] for k in kept}, old
        assert {k.rsplit("/c/", 1)[0] for k in set(chunks) - set(kept)} == {"samples/error"}, old


@pytest.mark.parametrize("old", OLD_STORES)
def test_older_formats_read_the_same_through_diffbank(fresh, old):
    from extract.store import open_store

    then, now = open_store(old), open_store(fresh)
    assert then.attrs["format_version"] == int(old.name[len("store_v")]) < now.attrs["format_version"]
    assert then.feature_names(None) == now.feature_names(None)
    for name in now.feature_names(None):
        assert then.read(name).tobytes() == now.read(name).tobytes(), name
        assert then.feature_info(name) == now.feature_info(name), name
        rows = np.array([17, 0, 9, 9])
        assert then.read(name, rows).tobytes() == now.read(name, rows).tobytes(), name
    np.testing.assert_array_equal(then.labels, now.labels)
    assert {k: v.tolist() for k, v in then.splits.items()} == {k: v.tolist() for k, v in now.splits.items()}
    xr = pytest.importorskip("xarray")
    name = now.feature_names()[0]
    a, b = then.to_xarray(name), now.to_xarray(name)  # the generic dims whatever the stored names
    assert a.dims == b.dims == ("sample", "channel", "y", "x")
    np.testing.assert_array_equal(a.values, b.values)
    if then.attrs["format_version"] >= 3:
        return
    # README: before format 3, plain xarray opens one feature at a time (all share channel/y/x names)
    others = [n for n in then.feature_names(None) if n != name]
    one = xr.open_zarr(str(old), group="features", drop_variables=others)[name]
    assert one.dims == ("sample", "channel", "y", "x")
    np.testing.assert_array_equal(one.values.astype(np.float32), now.read(name))
    with pytest.raises(ValueError, match="conflicting sizes"):
        xr.open_zarr(str(old), group="features")


def test_metadata_is_identical_apart_from_time_and_versions(fresh):
    ref, new = _files(REFERENCE / "store.zarr"), _files(fresh)
    for key in (k for k in ref if k.endswith("zarr.json")):
        a, b = json.loads(ref[key]), json.loads(new[key])
        assert _metadata(a) == _metadata(b), key
    root = json.loads(new["zarr.json"])
    assert set(root["attributes"]) >= VOLATILE_ATTRS
    consolidated = root["consolidated_metadata"]["metadata"]
    assert consolidated == json.loads(ref["zarr.json"])["consolidated_metadata"]["metadata"]


def test_extending_a_format_2_store_keeps_its_dimension_names(tmp_path):
    """A feature added to an older store is named by that store's rule: one store, one naming."""
    import shutil

    import yaml

    from extract.pipeline import extract
    from extract.store import open_store

    store = tmp_path / "v2.zarr"
    shutil.copytree(REFERENCE.parent / "store_v2.zarr", store)
    spec = yaml.safe_load((REFERENCE / "spec.yaml").read_text())
    spec["features"]["timesteps"] = [10, 50, 90]
    extract(spec, store, progress=False, threads=1)
    fs = open_store(store)
    assert fs.attrs["format_version"] == 2 and fs.is_complete()
    added = [n for n in fs.feature_names(None) if n.startswith("t090")]
    assert added
    for name in fs.feature_names(None):
        dims = fs.array(name).metadata.dimension_names
        assert dims == ("sample", "channel", "y", "x"), (name, dims)
