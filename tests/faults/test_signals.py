"""SIGKILL at random moments and Ctrl-C: every finished unit survives unchanged, and the resumed store
is byte-identical to an uninterrupted one."""

from __future__ import annotations

import random
import signal
import time

import numpy as np

from extract.store.lease import CREATING_KEY, LEASE_KEY

from .conftest import UNITS, assert_identical_to, cli, cli_process, done_units, unit_files


def _wait_for(path, proc, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return path.exists()


def _marked(store) -> int:
    """Units whose marker row is on disk (a marker chunk is written only once it holds a 1)."""
    folder = store / "_progress" / "done" / "c"
    return len(list(folder.glob("*/0"))) if folder.is_dir() else 0


def test_sigkill_at_random_moments_then_resume(tmp_path, spec_file, reference_store):
    store = tmp_path / "s.zarr"
    rng = random.Random(13)
    args = ["extract", str(spec_file), "--store", str(store), "--no-progress"]
    # Kill 1 at a random moment of start-up (imports, lease, creation); kills 2-6 at a random moment
    # after a random number of finished units: mid-unit, between units, while writing.
    targets = sorted(rng.sample(range(1, UNITS - 1), 5))
    kept: dict[int, dict[str, bytes]] = {}
    moments = []
    for attempt, target in enumerate([None, *targets]):
        proc = cli_process(args, env={"DIFFBANK_DEBUG_UNIT_DELAY": "0.5"})
        if target is None:
            time.sleep(rng.uniform(0.0, 1.5))
        else:
            deadline = time.time() + 120  # start-up on a loaded machine
            while _marked(store) < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"run {attempt} ended before it was killed"
        moments.append(_marked(store))
        if (store / "_progress" / "done" / "zarr.json").exists() and not (store / CREATING_KEY).exists():
            done = done_units(store)
            for unit in np.flatnonzero(done):
                now = unit_files(store, int(unit))
                assert kept.setdefault(int(unit), now) == now, f"unit {unit} changed after it was finished"
    assert 0 < len(kept) < UNITS and len(set(moments)) >= 4, moments
    final = cli(*args)
    assert final.exit_code == 0, final.output
    for unit, before in kept.items():
        assert unit_files(store, unit) == before
    assert_identical_to(reference_store, store)


def test_ctrl_c_keeps_finished_units_and_says_how_to_resume(tmp_path, spec_file, reference_store):
    store = tmp_path / "s.zarr"
    args = ["extract", str(spec_file), "--store", str(store), "--no-progress"]
    proc = cli_process(args, env={"DIFFBANK_DEBUG_UNIT_DELAY": "0.5"})
    assert _wait_for(store / "_progress" / "done" / "c" / "0" / "0", proc), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"interrupted: finished units are saved in {store}. Resume with:\n  diffbank extract" in err
    assert "Traceback" not in err
    assert not (store / LEASE_KEY).exists()  # released on the way out
    done = done_units(store)
    assert done[0] and not done.all()
    kept = {u: unit_files(store, u) for u in range(UNITS) if done[u]}
    resumed = cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert {u: unit_files(store, u) for u in kept} == kept
    assert_identical_to(reference_store, store)
