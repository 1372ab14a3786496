"""Stores on S3 (moto's server on 127.0.0.1): extract, kill, resume, verify, read, export; never written by readers."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from extract.store import open_store, save_features, verify

s3fs = pytest.importorskip("s3fs")


def _fs():
    return s3fs.S3FileSystem(skip_instance_cache=True)


def _snapshot(url: str) -> dict[str, tuple]:
    """Every object under a prefix with its size, ETag and modification time."""
    listing = _fs().find(url.removeprefix("s3://"), detail=True)
    return {k: (v["size"], v.get("ETag"), str(v.get("LastModified"))) for k, v in listing.items()}


def _small(url: str, **kw):
    rng = np.random.default_rng(1)
    feats = {
        "t090_b24_avg2": rng.standard_normal((40, 8, 2, 2)).astype(np.float16),
        "t150_b19_avg1": rng.standard_normal((40, 5, 1, 1)).astype(np.float32),
    }
    fs = save_features(
        url,
        feats,
        rng.integers(0, 3, 40),
        {"train": np.arange(30), "test": np.arange(30, 40)},
        shard_rows=16,
        chunk_rows=4,
        **kw,
    )
    return fs, feats


def test_save_read_verify_on_s3_with_consolidated_metadata(s3_bucket):
    url = f"{s3_bucket}/small.zarr"
    fs, feats = _small(url)
    again = open_store(url)
    assert again._root.metadata.consolidated_metadata is not None  # one request listed every array
    for name, data in feats.items():
        np.testing.assert_array_equal(again.read(name), data.astype(np.float32))
        rows = np.array([39, 2, 17, 17, 0])
        np.testing.assert_array_equal(again.read(name, rows), data[rows].astype(np.float32))
        for prefetch in (0, 2):
            batches = list(again.iter_batches(name, 7, prefetch=prefetch))
            np.testing.assert_array_equal(np.concatenate(batches), data.astype(np.float32))
    assert verify(url, full_scan=True).ok


def test_store_commands_take_storage_options_and_never_write(s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    from diffbank.cli import main

    url = f"{s3_bucket}/small.zarr"
    _, feats = _small(url)
    before = _snapshot(url)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint now comes from --storage-option alone
    opt = ["store", "--storage-option", f"endpoint_url={s3_endpoint}"]
    runner = CliRunner()
    info = runner.invoke(main, [*opt, "info", url, "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["complete"]
    ok = runner.invoke(main, [*opt, "verify", "--full", url])
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    out = tmp_path / "x.h5"
    exported = runner.invoke(main, [*opt, "export", url, str(out), "--compression", "none"])
    assert exported.exit_code == 0, exported.output
    import h5py

    with h5py.File(out) as h5:
        np.testing.assert_array_equal(h5["features/t090_b24_avg2"][:], feats["t090_b24_avg2"].astype(np.float32))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert _snapshot(url) == before  # info, verify and export wrote nothing


@pytest.mark.slow
def test_extract_into_s3_kill_resume_verify_read(s3_bucket, tmp_path):
    from test_pipeline import _cli, _images, _spec

    from extract.pipeline import extract

    images = _images(tmp_path / "imgs")
    spec = _spec(images, views={"hflip": False})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    url = f"{s3_bucket}/store.zarr"
    proc = _cli(
        ["extract", str(spec_path), "--store", url, "--no-progress", "--json"],
        env={"DIFFBANK_DEBUG_UNIT_DELAY": "0.8"},
    )
    marker = f"{url.removeprefix('s3://')}/_progress/done/c/0/0"  # unit 0's marker chunk
    deadline = time.time() + 120  # start-up (torch, s3fs, the model check) on a loaded machine
    while proc.poll() is None and time.time() < deadline and not _fs().exists(marker):
        time.sleep(0.05)
    assert _fs().exists(marker), proc.communicate()[1] if proc.poll() is not None else "no marker in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = open_store(url).unit_status()
    done = np.all(np.stack(list(done.values())), axis=0)
    assert done[0] and not done.all()
    resumed = _cli(["extract", str(spec_path), "--store", url, "--no-progress", "--json"])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    summary = json.loads(out)
    assert summary["units_already_done"] == np.flatnonzero(done).tolist()
    checked = _cli(["store", "verify", "--full", url])
    out, err = checked.communicate(timeout=60)
    assert checked.returncode == 0 and "OK" in out, out + err
    local = tmp_path / "local.zarr"
    extract(spec, local, progress=False)
    remote, here = open_store(url), open_store(local)
    assert remote._root.metadata.consolidated_metadata is not None
    assert remote.feature_names(None) == here.feature_names(None)
    for name in here.feature_names(None):
        assert remote.read(name).tobytes() == here.read(name).tobytes(), name
    np.testing.assert_array_equal(remote.labels, here.labels)
    assert {k: v.tolist() for k, v in remote.splits.items()} == {k: v.tolist() for k, v in here.splits.items()}


def test_readers_never_write_to_a_read_only_directory(tmp_path):
    from diffbank.cli import main

    path = tmp_path / "ro.zarr"
    _small(path)
    files = sorted(p for p in path.rglob("*"))
    before = {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in files}
    for p in [*files, path]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        fs = open_store(path)
        for name in fs.feature_names(None):
            fs.read(name)
            list(fs.iter_batches(name, 16))
        assert verify(path, full_scan=True).ok
        runner = CliRunner()
        for args in (["info", str(path)], ["verify", "--full", str(path)]):
            result = runner.invoke(main, ["store", *args])
            assert result.exit_code == 0, result.output
        result = runner.invoke(main, ["store", "export", str(path), str(tmp_path / "o.h5")])
        assert result.exit_code == 0, result.output
    finally:
        for p in [path, *files]:
            p.chmod(p.stat().st_mode | 0o200)
    after = {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in files}
    assert sorted(str(p) for p in path.rglob("*")) == sorted(before)
    assert after == before


def test_readers_work_with_read_only_credentials(s3_bucket, s3_endpoint, tmp_path):
    """An IAM user allowed only s3:GetObject/ListBucket reads, verifies and exports a store; writes are refused."""
    import urllib.request

    import boto3

    url = f"{s3_bucket}/small.zarr"
    _, feats = _small(url)
    before = _snapshot(url)
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    iam.create_user(UserName="reader")
    # AWS authorises HeadObject as s3:GetObject and ListObjectsV2 as s3:ListBucket; moto 5.2 checks the
    # operations' own names (s3:HeadObject, s3:ListObjectsV2). Both spellings are reads: nothing here writes.
    reads = ["s3:GetObject", "s3:ListBucket", "s3:HeadObject", "s3:ListObjectsV2"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": reads, "Resource": "*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    options = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "skip_instance_cache": True}

    def auth(count: str) -> None:  # moto checks credentials and policies only after this call
        request = urllib.request.Request(
            f"{s3_endpoint}/moto-api/reset-auth", data=count.encode(), headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request).close()

    auth("0")
    try:
        fs = open_store(url, options)
        for name, data in feats.items():
            np.testing.assert_array_equal(fs.read(name), data.astype(np.float32))
        assert verify(url, full_scan=True, storage_options=options).ok
        from extract.store import export_hdf5

        export_hdf5(fs, tmp_path / "o.h5")
        with pytest.raises(PermissionError):
            s3fs.S3FileSystem(**options).pipe(f"{url.removeprefix('s3://')}/probe-write", b"x")
    finally:
        auth("inf")
    assert _snapshot(url) == before


def test_verify_full_finds_a_flipped_byte_and_a_lost_shard_on_s3(s3_bucket):
    url = f"{s3_bucket}/small.zarr"
    _small(url)
    base = f"{url.removeprefix('s3://')}/features/t090_b24_avg2/c"
    fs = _fs()
    raw = bytearray(fs.cat(f"{base}/1/0/0/0"))
    raw[20] ^= 0x01
    fs.pipe(f"{base}/1/0/0/0", bytes(raw))
    fs.rm(f"{base}/2/0/0/0")
    problems = verify(url, full_scan=True).problems
    assert len(problems) == 2, problems
    assert "unit 1 (rows 16-31)" in problems[0] and "fails its checksum" in problems[0]
    assert "unit 2 (rows 32-39): marked done but its data is absent" in problems[1]


def _without_clocks(doc):
    """A results document without wall-clock durations (`seconds`, `refit_seconds`, ...) at any depth."""
    if isinstance(doc, dict):
        return {k: _without_clocks(v) for k, v in doc.items() if not k.endswith("seconds")}
    if isinstance(doc, list):
        return [_without_clocks(v) for v in doc]
    return doc


def _tensors(path) -> dict[str, bytes]:
    from safetensors.numpy import load_file

    return {k: v.tobytes() for k, v in load_file(str(path)).items()}


@pytest.mark.slow
def test_probe_commands_read_an_s3_store_as_a_local_copy(s3_bucket, s3_endpoint, monkeypatch, tmp_path):
    """Extract into S3, then `probe linear` and `probe logistic` from it with --storage-option alone: the
    same results (and head weights, byte for byte) as on a local copy of the store; nothing written to S3."""
    from diffbank.cli import main

    spec = yaml.safe_load(open("tests/data/reference/spec.yaml"))
    spec["dataset"]["limit"] = {"train": 150, "test": 50}
    spec["views"] = {"center": True, "hflip": False}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    url = f"{s3_bucket}/probe.zarr"
    runner = CliRunner()
    opt = ["--storage-option", f"endpoint_url={s3_endpoint}"]
    made = runner.invoke(main, ["extract", str(spec_path), "--store", url, "--no-progress", "--threads", "1", *opt])
    assert made.exit_code == 0, made.output
    local = tmp_path / "local.zarr"
    _fs().get(url.removeprefix("s3://"), str(local), recursive=True)
    before = _snapshot(url)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from --storage-option alone
    runs = {
        "linear": [
            "--feature",
            "t050_b05_avg2",
            "--epochs",
            "3",
            "--lr",
            "0.05",
            "--batch-size",
            "16",
            "--val-fraction",
            "0.2",
            "--quiet",
        ],
        "logistic": ["--feature", "t010_b02_avg1", "--c", "0.1", "--c", "10", "--val-fraction", "0.2"],
    }
    for command, args in runs.items():
        docs, heads = [], []
        for where, store, extra in (("s3", url, opt), ("local", str(local), [])):
            out = tmp_path / f"{command}-{where}"
            result = runner.invoke(main, ["probe", command, store, "--out", str(out), *args, *extra])
            assert result.exit_code == 0, result.output
            doc = json.loads((out / "results.json").read_text())
            assert doc["store"]["url"] == store
            when = ("store", "timings", "started_at", "finished_at", "environment")  # where and when, not what
            assert doc["metrics"]["test"]["top1"] > 0.3  # chance is 0.1: the probe learned from the features
            docs.append(_without_clocks({k: v for k, v in doc.items() if k not in when}))
            heads.append([_tensors(p) for p in sorted(out.glob("*.safetensors"))])  # metadata names the store
        assert docs[0] == docs[1], command
        assert heads[0] == heads[1], command
        assert (command == "linear") == bool(heads[0])
    bad = runner.invoke(main, ["probe", "logistic", url, "--out", str(tmp_path / "x"), "--storage-option", "nokey"])
    assert bad.exit_code == 1 and "write key=value" in bad.output and not (tmp_path / "x").exists()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert _snapshot(url) == before  # the probes wrote nothing to the store


def test_plain_xarray_opens_an_s3_store(s3_bucket, s3_endpoint):
    """A team without diffbank opens a shared store with xarray alone (format 3: one Dataset of features)."""
    xr = pytest.importorskip("xarray")
    url = f"{s3_bucket}/small.zarr"
    fs, feats = _small(url)
    options = {"endpoint_url": s3_endpoint}
    tree = xr.open_datatree(url, engine="zarr", storage_options=options)
    ds = tree["features"].to_dataset().assign_coords(tree["samples"].to_dataset().variables)
    for name, data in feats.items():
        np.testing.assert_array_equal(ds[name].values, data)
    np.testing.assert_array_equal(ds["label"].values, fs.labels)
    assert int(tree["splits"]["test"].sum()) == 10
