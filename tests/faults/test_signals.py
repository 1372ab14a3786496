"""SIGKILL at random moments and Ctrl-C: every finished unit survives unchanged, and the resumed store
is byte-identical to an uninterrupted one."""

from __future__ import annotations

import random
import signal
import time

from extract.store.lease import LEASE_KEY

from .conftest import UNITS, assert_identical_to, cli, cli_process, done_units, unit_files


def _wait_for(path, proc, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return path.exists()


def test_sigkill_at_random_moments_then_resume(tmp_path, spec_file, reference_store):
    store = tmp_path / "s.zarr"
    rng = random.Random(13)
    args = ["extract", str(spec_file), "--store", str(store), "--no-progress"]
    kept: dict[int, dict[str, bytes]] = {}
    moments = []
    for attempt in range(5):
        proc = cli_process(args, env={"DIFFBANK_DEBUG_UNIT_DELAY": "0.3"})
        if attempt == 0:
            delay = rng.uniform(0.5, 4.0)  # any moment from start-up on: imports, creation, units
            time.sleep(delay)
        else:
            _wait_for(store / LEASE_KEY, proc)  # the run holds the store: kill it at work
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        moments.append(round(delay, 2))
        if not (store / "_progress").exists():
            continue
        done = (
            done_units(store)
            if (store / "zarr.json").exists() and (store / "_progress/done/zarr.json").exists()
            else []
        )
        for unit in range(len(done)):
            if done[unit]:
                now = unit_files(store, unit)
                assert kept.setdefault(unit, now) == now, f"unit {unit} changed after it was finished"
    assert 0 < len(kept) < UNITS, f"the kills at {moments} s should leave some but not all units done"
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
