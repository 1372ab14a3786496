"""Extraction against a committed reference store, with each claim where it holds.

tests/data/reference/store.zarr was written by `diffbank extract tests/data/reference/spec.yaml` (one torch
thread); its provenance records the machine signature it was written on (`compute.machine`).
tests/data/store_v1.zarr, store_v2.zarr and store_v3.zarr keep the same content in store formats 1 to 3 (format
4 stores every chunk, fill values included, so that an absent chunk is damage: here the error strings of units
without failures; no other chunk file changed).

What a fresh extraction of the same spec must give:
- everywhere: the same layout (every array, chunk file and shape), the same metadata apart from what records
  when, with which library versions and on which machine it was written, and the same sample ids, labels,
  validity, splits and progress markers byte for byte;
- on a machine whose signature runs the same kernels as the reference's: float features bit for bit;
- elsewhere: float16 features within one ulp of the reference (AVX2 against AVX-512 measured 9 of 29,952
  values one ulp apart, none further), and float statistics within 1e-6 relative;
- on any machine: a second extraction with another batch size, killed midway and resumed, byte for byte
  equal to the first (the determinism that does not depend on the CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner
from faults.conftest import cli_process, done_units, files, kill_after_first_unit

from extract.hardware import describe_signature, machine_signature, same_kernels
from extract.pipeline import extract
from extract.store import open_store

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
OLD_STORES = [REFERENCE.parent / f"store_v{v}.zarr" for v in (1, 2, 3)]
# What says when, with which installed versions and on which machine a store was written: not its content.
VOLATILE_ATTRS = {"created", "finalized", "versions", "diffbank_version"}
FLOAT_GROUPS = ("features",)  # chunk files whose bytes depend on the machine's kernels
MACHINE_ARRAYS = ("_progress/machine", "_progress/stats")  # per-unit records of the machine and float statistics
ULP_BOUND = 1  # float16 features across instruction sets (see the module docstring)
STATS_RTOL = 1e-6



def _provenance_signature(store: Path) -> dict | None:
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    return attrs.get("provenance", {}).get("compute", {}).get("machine")


def _split_metadata(doc: dict) -> tuple[dict, list[float]]:
    """A zarr.json without volatile attributes, machine records and the consolidated copy, and its float
    statistics apart (they come from float32 features, so they follow the machine's kernels)."""
    doc = json.loads(json.dumps(doc))
    doc.pop("consolidated_metadata", None)
    attrs = doc.get("attributes", {})
    for key in VOLATILE_ATTRS:
        attrs.pop(key, None)
    attrs.get("provenance", {}).get("compute", {}).pop("machine", None)
    floats: list[float] = []
    stats = attrs.get("stats")
    if isinstance(stats, dict) and "max_abs" in stats:
        floats.append(stats.pop("max_abs"))
    return doc, floats


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "store.zarr"
    from diffbank.cli import main

    result = CliRunner().invoke(main, ["extract", str(REFERENCE / "spec.yaml"), "--store", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def same_machine_kind(fresh) -> bool:
    return same_kernels(_provenance_signature(REFERENCE / "store.zarr"), _provenance_signature(fresh))


def test_the_fresh_store_records_this_machine(fresh):
    recorded = _provenance_signature(fresh)
    assert same_kernels(recorded, machine_signature("cpu", threads=1)), describe_signature(recorded)
    assert recorded["cpu_capability"] and recorded["torch"] and recorded["threads"] == 1
    assert _provenance_signature(REFERENCE / "store.zarr"), "the reference store records its machine"


def test_every_unit_records_the_machine_that_wrote_it(fresh):
    units = open_store(fresh).unit_machines()
    assert units is not None and len(units) == 3
    assert all(len(signatures) == 1 and same_kernels(signatures[0], _provenance_signature(fresh)) for signatures in units)


def test_layout_and_metadata_are_identical_everywhere(fresh):
    ref, new = files(REFERENCE / "store.zarr"), files(fresh)
    assert sorted(ref) == sorted(new)
    for key in (k for k in ref if k.endswith("zarr.json")):
        (a, a_floats), (b, b_floats) = _split_metadata(json.loads(ref[key])), _split_metadata(json.loads(new[key]))
        assert a == b, key
        np.testing.assert_allclose(b_floats, a_floats, rtol=STATS_RTOL, err_msg=key)
    root = json.loads(new["zarr.json"])
    assert set(root["attributes"]) >= VOLATILE_ATTRS


def test_samples_splits_and_markers_are_byte_identical_everywhere(fresh):
    ref, new = files(REFERENCE / "store.zarr"), files(fresh)
    exact = [
        k
        for k in ref
        if not k.endswith("zarr.json")
        and not k.startswith(FLOAT_GROUPS)
        and not any(k.startswith(f"{a}/") for a in MACHINE_ARRAYS)
    ]
    assert any(k.startswith("samples/") for k in exact) and any(k.startswith("_progress/done/") for k in exact)
    assert any(k.startswith("splits/") for k in exact)
    for key in exact:
        assert ref[key] == new[key], key
    a = zarr.open_array(str(REFERENCE / "store.zarr" / "_progress" / "stats"), mode="r")[:]
    b = zarr.open_array(str(fresh / "_progress" / "stats"), mode="r")[:]
    np.testing.assert_array_equal(a[..., 1:], b[..., 1:])  # inf, NaN and overflow counts
    np.testing.assert_allclose(b[..., 0], a[..., 0], rtol=STATS_RTOL)  # max |x| of float32 features


def test_float_features_bit_for_bit_on_the_same_machine_kind_else_within_one_ulp(fresh, same_machine_kind):
    ref = zarr.open_group(str(REFERENCE / "store.zarr"), mode="r", use_consolidated=False)
    new = zarr.open_group(str(fresh), mode="r", use_consolidated=False)
    names = sorted(n for n, _ in ref["features"].arrays())
    assert names and sorted(n for n, _ in new["features"].arrays()) == names
    for name in names:
        a, b = np.asarray(ref["features"][name][:]), np.asarray(new["features"][name][:])
        assert a.dtype == b.dtype == np.float16 and a.shape == b.shape, name
        if same_machine_kind:
            assert a.tobytes() == b.tobytes(), name
            continue
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)))
        apart = np.abs(a.astype(np.float32) - b.astype(np.float32)) / ulp.astype(np.float32)
        assert apart.max() <= ULP_BOUND, (name, float(apart.max()))
        assert (a != b).mean() < 0.01, (name, float((a != b).mean()))  # rare last-bit differences, not drift
    if same_machine_kind:  # then the chunk files themselves (Blosc-LZ4 is deterministic)
        ref_files, new_files = files(REFERENCE / "store.zarr"), files(fresh)
        for key in (k for k in ref_files if k.startswith("features/") and not k.endswith("zarr.json")):
            assert ref_files[key] == new_files[key], key



@pytest.mark.slow
def test_another_batch_size_killed_and_resumed_gives_the_same_bytes_on_any_machine(fresh, tmp_path):
    """The exact check that holds on every CPU: same machine, same spec, another grouping and a SIGKILL."""
    spec = yaml.safe_load((REFERENCE / "spec.yaml").read_text())
    spec["compute"]["batch_size"] = 2
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    killed = tmp_path / "killed.zarr"
    args = ["extract", str(spec_path), "--store", str(killed), "--no-progress"]
    kill_after_first_unit(cli_process(args, env={"DIFFBANK_DEBUG_UNIT_DELAY": "1.0"}), killed)
    done = done_units(killed)
    assert done[0] and not done.all()
    resumed = cli_process(args)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    a, b = files(fresh), files(killed)
    assert sorted(a) == sorted(b)
    for key in (k for k in a if not k.endswith("zarr.json")):
        assert a[key] == b[key], key


@pytest.mark.parametrize("old", OLD_STORES)
def test_older_formats_hold_the_reference_values(old):
    """Committed stores against the committed reference: no computation, so bit for bit on any machine."""
    then, now = open_store(old), open_store(REFERENCE / "store.zarr")
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
    # before format 3, plain xarray opens one feature at a time (all share channel/y/x names)
    others = [n for n in then.feature_names(None) if n != name]
    one = xr.open_zarr(str(old), group="features", drop_variables=others)[name]
    assert one.dims == ("sample", "channel", "y", "x")
    np.testing.assert_array_equal(one.values.astype(np.float32), now.read(name))
    with pytest.raises(ValueError, match="conflicting sizes"):
        xr.open_zarr(str(old), group="features")


def test_older_chunk_files_are_the_reference_chunkfiles():
    """Format 3 renamed dimensions and changed no chunk; format 4 added the chunks of fill values (here the
    error strings of units without failures) and changed no other (committed files: holds everywhere)."""
    ref = files(REFERENCE / "store.zarr")
    chunks = [k for k in ref if not k.endswith("zarr.json") and not k.startswith("_progress/machine/")]
    for old in ("store_v2.zarr", "store_v3.zarr"):
        kept = {k: v for k, v in files(REFERENCE.parent / old).items() if not k.endswith("zarr.json")}
        assert kept and kept == {k: ref[k] for k in kept}, old
        assert {k.rsplit("/c/", 1)[0] for k in set(chunks) - set(kept)} == {"samples/error"}, old


def test_extending_a_format_2_store_keeps_its_dimension_names(tmp_path):
    """A feature added to an older store is named by that store's rule: one store, one naming."""
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
