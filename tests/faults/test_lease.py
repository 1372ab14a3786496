"""One writer at a time: a second writer is refused, a stale lease is broken only on request, and
finalize merges into the root it reads fresh instead of overwriting it from a stale copy."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import zarr

from extract.pipeline import extract
from extract.store.lease import LEASE_KEY
from extract.store.writer import feature_list_problems

from .conftest import assert_identical_to, cli, files, tiny_spec


def _partial_store(path, units=(0, 1, 2)):
    extract(tiny_spec(), path, progress=False, units=list(units), finalize=False)
    return files(path)


def test_second_writer_is_refused_naming_the_holder(tmp_path, spec_file, no_compute):
    store = tmp_path / "s.zarr"
    before = _partial_store(store)
    no_compute()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from extract.store.lease import acquire; acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
        assert result.exit_code == 1, result.output
        assert "being written by another writer" in result.output
        assert f"pid {holder.pid}" in result.output and socket.gethostname() in result.output
        assert "Traceback" not in result.output and "resume with" not in result.output
        # --break-lease does not take over a live writer's fresh lease
        again = cli("extract", str(spec_file), "--store", str(store), "--no-progress", "--break-lease")
        assert again.exit_code == 1 and "only takes over a lease whose heartbeat is stale" in again.output
        after = files(store)
        assert LEASE_KEY in after
        after.pop(LEASE_KEY)
        assert after == before  # the refused writer wrote nothing
    finally:
        holder.kill()
        holder.wait()


def _plant_lease(store, age_s: float, host: str = "elsewhere") -> dict:
    now = time.time() - age_s
    record = {
        "token": "abc",
        "owner": "someone",
        "host": host,
        "pid": 4242,
        "started": "2026-01-01T00:00:00Z",
        "heartbeat": "2026-01-01T00:00:00Z",
        "heartbeat_epoch": now,
    }
    (store / LEASE_KEY).write_text(json.dumps(record))
    return record


def test_stale_lease_needs_break_lease_and_says_so(tmp_path, spec_file, reference_store):
    store = tmp_path / "s.zarr"
    before = _partial_store(store)
    _plant_lease(store, age_s=3600)
    refused = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert refused.exit_code == 1, refused.output
    assert "someone@elsewhere pid 4242" in refused.output and "stale" in refused.output
    assert "--break-lease" in refused.output and "Traceback" not in refused.output
    now = files(store)
    now.pop(LEASE_KEY)
    assert now == before
    taken = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert taken.exit_code == 1  # still refused without the flag
    broken = cli("extract", str(spec_file), "--store", str(store), "--no-progress", "--break-lease")
    assert broken.exit_code == 0, broken.output
    assert "breaking the stale writer lease of someone@elsewhere pid 4242" in broken.output
    assert_identical_to(reference_store, store)  # the finished units were kept, the rest completed


def test_fresh_lease_of_another_host_is_never_broken(tmp_path, spec_file, no_compute):
    store = tmp_path / "s.zarr"
    _partial_store(store)
    no_compute()
    _plant_lease(store, age_s=5)
    result = cli("extract", str(spec_file), "--store", str(store), "--no-progress", "--break-lease")
    assert result.exit_code == 1 and "someone@elsewhere" in result.output


def test_finalize_merges_into_a_root_changed_since_it_opened(tmp_path):
    """The bug: an older run's finalize rewrote the root from the copy it read at start, hiding an
    extension's features. Here the extension runs while the older writer is still open."""
    from extract.pipeline import prepare

    store = tmp_path / "s.zarr"
    old = prepare(tiny_spec(), store)  # the older run, still open
    grown = tiny_spec(features={"timesteps": [10, 50]})
    extract(grown, store, progress=False)  # extends and finalizes (the lease is reentrant in-process)
    old.writer.finalize()  # must not bring back the old feature list and fingerprint
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    from extract.spec import load_spec

    assert root.attrs["fingerprint"] == load_spec(grown).fingerprint
    assert len(root.attrs["features"]) == 4 and root.attrs["complete"] is True
    assert feature_list_problems(root) == []


def test_feature_list_check_finds_hidden_arrays(tmp_path, reference_store):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(reference_store, store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    assert feature_list_problems(root) == []
    root.attrs.update({"features": root.attrs["features"][:1]})  # what a stale overwrite left behind
    problems = feature_list_problems(root)
    assert any("not in the root's feature list" in p for p in problems)
