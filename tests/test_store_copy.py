"""`diffbank store copy`: local -> S3 -> local byte for byte, the write order, a copy killed midway and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from diffbank.cli import main
from extract.store import StoreError, open_store, save_features
from extract.store.copy import COPY_DELAY_ENV, copy_order, copy_store


def _small(path: Path) -> Path:
    rng = np.random.default_rng(3)
    save_features(
        path,
        {
            "t090_b24_avg2": rng.standard_normal((40, 8, 2, 2)).astype(np.float16),
            "t150_b19_avg1": rng.standard_normal((40, 5, 1, 1)).astype(np.float32),
        },
        rng.integers(0, 3, 40),
        {"train": np.arange(30), "test": np.arange(30, 40)},
        shard_rows=8,
        chunk_rows=4,
    )
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def test_copy_order_puts_data_then_markers_then_metadata_root_last():
    keys = [
        "zarr.json",
        "_progress/done/c/0/0",
        "features/f/c/0/0/0/0",
        "features/zarr.json",
        "_progress/done/zarr.json",
        "features/f/zarr.json",
        "samples/label/c/0",
    ]
    data, markers, metadata = copy_order(keys)
    assert data == ["features/f/c/0/0/0/0", "samples/label/c/0"]
    assert markers == ["_progress/done/c/0/0"]
    assert metadata[-1] == "zarr.json" and sorted(metadata) == sorted(k for k in keys if k.endswith("zarr.json"))
    assert metadata.index("features/f/zarr.json") < metadata.index("features/zarr.json")


def test_objects_land_in_order(tmp_path, monkeypatch):
    src = _small(tmp_path / "s.zarr")
    landed: list[str] = []
    memory = fsspec.filesystem("memory")
    pipe = memory.pipe_file

    def record(path, value, *args, **kwargs):
        landed.append(path.split("copied.zarr/", 1)[1])
        return pipe(path, value, *args, **kwargs)

    monkeypatch.setattr(memory, "pipe_file", record)
    summary = copy_store(str(src), "memory://copied.zarr", workers=1)
    assert summary.copied == summary.objects == len(landed) == len(_files(src))
    phase = [2 if k.endswith("zarr.json") else 1 if k.startswith("_progress/") else 0 for k in landed]
    assert phase == sorted(phase) and landed[-1] == "zarr.json"
    assert _objects("memory://copied.zarr") == _files(src)
    memory.rm("copied.zarr", recursive=True)


def test_local_to_s3_to_local_is_byte_identical(s3_bucket, tmp_path):
    src = _small(tmp_path / "s.zarr")
    remote = f"{s3_bucket}/copy.zarr"
    back = tmp_path / "back.zarr"
    runner = CliRunner()
    up = runner.invoke(main, ["store", "copy", str(src), remote])
    assert up.exit_code == 0, up.output
    assert "OK" in up.output
    assert _objects(remote) == _files(src)
    down = runner.invoke(main, ["store", "copy", remote, str(back)])
    assert down.exit_code == 0, down.output
    assert _files(back) == _files(src)
    again = runner.invoke(main, ["store", "copy", remote, str(back)])
    assert again.exit_code == 1 and "already holds a store" in again.output


def test_copy_refuses_a_store_being_written(tmp_path):
    src = _small(tmp_path / "s.zarr")
    (src / "_lease.json").write_text("{}")
    with pytest.raises(StoreError, match="being written"):
        copy_store(str(src), str(tmp_path / "d.zarr"))


def test_copy_killed_midway_is_no_store_and_resumes_byte_identical(s3_bucket, tmp_path):
    src = _small(tmp_path / "s.zarr")
    total = len(_files(src))
    dst = f"{s3_bucket}/killed.zarr"
    cmd = [sys.executable, "-c", "from diffbank.cli import main; main()", "store", "copy", str(src), dst]
    env = {**os.environ, COPY_DELAY_ENV: "0.3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--workers", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fs, root = fsspec.core.url_to_fs(dst)
    deadline = time.time() + 120  # start-up on a loaded machine
    while proc.poll() is None and time.time() < deadline and len(fs.find(root)) < 5:
        time.sleep(0.05)
        fs.invalidate_cache()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    landed = len(fs.find(root))
    assert 5 <= landed < total, proc.stderr.read().decode()
    with pytest.raises((StoreError, FileNotFoundError)):
        open_store(dst)  # a half copy is no store at all, never a complete-looking one
    runner = CliRunner()
    refused = runner.invoke(main, ["store", "copy", str(src), dst])
    assert refused.exit_code == 1 and "partial copy" in refused.output, refused.output
    resumed = runner.invoke(main, ["store", "copy", str(src), dst, "--resume", "--full"])
    assert resumed.exit_code == 0, resumed.output
    assert f"already there, of {total}" in resumed.output
    assert _objects(dst) == _files(src)
    assert open_store(dst).is_complete()
