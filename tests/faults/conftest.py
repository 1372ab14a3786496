"""The fault battery's shared pieces: a tiny spec that extracts in seconds, store snapshots, the CLI."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from extract.models.config import TINY_FLAGS

UNITS = 8  # 32 rows in units of 4


def tiny_spec(**over) -> dict:
    spec = {
        "name": "faults",
        "model": {"flags": dict(TINY_FLAGS), "init_seed": 0},
        "dataset": {"kind": "digits", "splits": ["train", "test"], "limit": {"train": 24, "test": 8}},
        "features": {"timesteps": [10], "blocks": [2, 4], "pooling": [1]},
        "noise": {"seed": 1, "draws": 1},
        "views": {"center": True, "hflip": False},
        "storage": {"shard_rows": 4, "chunk_rows": 2},
        "compute": {"batch_size": 4, "device": "cpu", "num_workers": 0},
    }
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


@pytest.fixture()
def spec_file(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec()))
    return path


@pytest.fixture(scope="session")
def reference_store(tmp_path_factory) -> Path:
    """The tiny spec extracted once, uninterrupted: what every resumed store must equal."""
    from extract.pipeline import extract

    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    extract(tiny_spec(), out, progress=False)
    return out


def cli(*args: str):
    """Run `diffbank` in-process; the result's `output` holds stdout and stderr."""
    from diffbank.cli import main

    return CliRunner().invoke(main, list(args))


def cli_process(args: list[str], env: dict[str, str] | None = None, code: str = "") -> subprocess.Popen:
    """`diffbank` in a child process (for signals); `code` runs first (fault injection)."""
    prog = f"{code}\nfrom diffbank.cli import main\nmain()"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", prog, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        text=True,
        # A suite started in the background (`cmd &` without job control) ignores SIGINT, the child would
        # inherit that, and Python then installs no KeyboardInterrupt handler: Ctrl-C tests need the default.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def files(root: Path, skip_metadata: bool = False) -> dict[str, bytes]:
    """Every file of a store by relative path (zarr.json metadata optionally left out)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (skip_metadata and p.name == "zarr.json")
    }


def arrays(root: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(root), mode="r", use_consolidated=False)
    out = {}
    for group in ("features", "samples", "splits", "_progress"):
        for name, arr in g[group].arrays():
            out[f"{group}/{name}"] = np.asarray(arr[:])
    return out


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.kind == "f":
            assert a[key].tobytes() == b[key].tobytes(), key
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_identical_to(reference: Path, store: Path) -> None:
    """Same decoded arrays bit for bit and the same chunk files byte for byte; no leftovers."""
    assert_same_arrays(arrays(reference), arrays(store))
    assert files(reference, skip_metadata=True) == files(store, skip_metadata=True)
    assert sorted(files(reference)) == sorted(files(store))  # no lease, marker or temporary left behind


def done_units(store: Path) -> np.ndarray:
    g = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return np.asarray(g["_progress/done"][:]).all(axis=1)


def kill_after_first_unit(proc: subprocess.Popen, store: Path, timeout: float = 120) -> None:
    """SIGKILL an extraction once unit 0's marker is on disk (`timeout` covers start-up on a loaded machine)."""
    marker = store / "_progress" / "done" / "c" / "0" / "0"
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1] if proc.poll() is not None else "no marker in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def unit_files(store: Path, unit: int) -> dict[str, bytes]:
    """The shard files of one unit (every feature's shard `unit`), which a finished unit never changes."""
    return {
        k: v
        for k, v in files(store, skip_metadata=True).items()
        if k.startswith("features/") and k.endswith(f"c/{unit}/0/0/0")
    }


@pytest.fixture()
def read_only(monkeypatch):
    """Make writes under a path fail as on read-only media (chmod cannot stop root, who runs CI here)."""

    def protect(root: Path) -> None:
        root = str(Path(root).resolve())

        def inside(path) -> bool:
            try:
                return str(Path(os.fspath(path)).resolve()).startswith(root)
            except TypeError:
                return False

        def refuse(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

        real_open, real_io_open = os.open, io.open

        def os_open(path, flags, *a, **k):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_open(path, flags, *a, **k)

        def io_open(file, mode="r", *a, **k):
            if not isinstance(file, int) and inside(file) and any(c in mode for c in "wax+"):
                refuse(file)
            return real_io_open(file, mode, *a, **k)

        for name in ("mkdir", "unlink", "rmdir", "replace", "rename"):
            real = getattr(os, name)

            def guarded(path, *a, _real=real, **k):
                if inside(path):
                    refuse(path)
                return _real(path, *a, **k)

            monkeypatch.setattr(os, name, guarded)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(io, "open", io_open)

    return protect


@pytest.fixture()
def no_compute(monkeypatch):
    """Call it once the test's setup is done: from then on, building the model or running the U-Net fails."""

    def boom(*a, **k):
        raise AssertionError("the model was built or run before the refusal")

    def forbid() -> None:
        monkeypatch.setattr("extract.prepare.build", boom)
        monkeypatch.setattr("extract.pipeline.build", boom)
        monkeypatch.setattr("extract.compute.Computer.compute", boom)

    return forbid
