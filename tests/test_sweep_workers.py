"""`probe sweep --workers/--scheduler`: the features trained on dask workers give the one-process results (same
records, same weights byte for byte), and a worker killed mid-task loses no feature."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffbank.cli import main
from probe.data import ProbeData
from probe.options import SweepOptions
from probe.run import run_sweep
from probe.sweep_workers import plan_parts

pytest.importorskip("dask.distributed")

# A budget small enough that the data streams in windows of a few dozen rows and an epoch's order depends on
# the window: a part that sized its own window (half the features, twice the rows) would see other batches.
BUDGET = "64KiB"
SWEEP = ["--lr", "0.1", "--lr", "0.01", "--epochs", "3", "--batch-size", "16", "--memory-budget", BUDGET, "-q"]
# What the one-process and the distributed run must share in results.json (timings, dates and the cluster
# record differ by nature).
SAME = ("features", "feature_shapes", "config", "split_definition", "data_mode", "metrics", "selected")
SAME += ("sweep", "grid", "training", "figures", "weights", "logits", "recipe", "noise_draws")


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(
        n=150,
        k=3,
        dim=6,
        seed=1,
        n_train=120,
        class_names=["x", "y", "z"],
        noise=lambda t, block: 0.7 if (t, block) == (150, 19) else 2.5,
    )


@pytest.fixture(autouse=True)
def one_thread():
    """The bits of a matmul depend on torch's thread count: one thread here, as in each worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_process(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "sweep"
    result = CliRunner().invoke(main, ["probe", "sweep", store, "--out", str(out), *SWEEP], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _safetensors(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (its JSON header, the bytes of every tensor): the header's metadata is written in
    a per-process hash order, so the file's own bytes differ between two runs of one process too."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _assert_same_run(one: Path, other: Path) -> dict:
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, other))
    for key in SAME:
        assert a[key] == b[key], key
    assert len(a["sweep"]) == 8 * 2 and "cluster" in b and "cluster" not in a
    header_a, weights_a = _safetensors(one / "heads.safetensors")
    header_b, weights_b = _safetensors(other / "heads.safetensors")
    assert header_a == header_b and weights_a == weights_b
    with np.load(one / "logits.npz") as x, np.load(other / "logits.npz") as y:
        assert sorted(x.files) == sorted(y.files)
        for name in x.files:
            np.testing.assert_array_equal(x[name], y[name])
    assert (other / "heatmap.png").exists() and (other / "accuracy_vs_t.png").exists()
    return b


def test_two_workers_write_the_one_process_results(store, one_process, tmp_path):
    out = tmp_path / "workers"
    args = ["probe", "sweep", store, "--out", str(out), *SWEEP, "--workers", "2"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = _assert_same_run(one_process, out)
    assert doc["data_mode"] == "streamed"
    parts = doc["cluster"]["parts"]
    assert doc["cluster"]["workers"] == 2 and len(parts) == 2
    assert sorted(f for p in parts for f in p["features"]) == sorted(doc["features"])
    assert len({p["worker"] for p in parts}) == 2  # each part ran in its own process
    # wall and CPU seconds of each phase: the client's, each part's (its start-up before the task included)
    client = doc["cluster"]["client"]
    assert {"before", "cluster_wait", "plan", "wait", "report_imports", "merge"} <= set(client)
    assert all({"before_task", "data", "train", "eval"} <= set(p) for p in parts)
    assert all(p[k]["cpu_s"] >= 0 and p[k]["wall_s"] >= 0 for p in parts for k in ("before_task", "train"))
    one = json.loads((one_process / "results.json").read_text())
    for run in (one, doc):
        assert {"before", "setup", "train", "evaluate", "report"} == set(run["phases"])


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as running:
        yield running


def test_workers_read_an_s3_store_with_the_storage_options(
    store, one_process, cluster, s3_bucket, s3_endpoint, tmp_path
):
    from extract.store.copy import copy_store

    url = f"{s3_bucket}/s.zarr"
    copy_store(store, url)
    out = tmp_path / "s3"
    args = ["probe", "sweep", url, "--out", str(out), *SWEEP, "--scheduler", cluster.scheduler_address]
    result = CliRunner().invoke(
        main, [*args, "--storage-option", f"endpoint_url={s3_endpoint}"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    doc = _assert_same_run(one_process, out)
    assert doc["store"]["url"] == url and doc["cluster"]["scheduler"] == cluster.scheduler_address


def test_a_worker_killed_mid_task_is_replaced_and_no_feature_is_lost(store, one_process, cluster, tmp_path):
    from dask.distributed import Client

    killed: dict[str, int] = {}
    watching = threading.Event()

    def kill_a_busy_worker(address: str) -> None:
        with Client(address) as client:
            watching.set()
            deadline = time.time() + 60
            while time.time() < deadline:
                busy = [w for w, keys in client.processing().items() if keys]
                if busy:
                    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
                    return
                time.sleep(0.01)

    killer = threading.Thread(target=kill_a_busy_worker, args=(cluster.scheduler_address,))
    killer.start()
    assert watching.wait(60)  # the sweep starts once the killer watches the scheduler
    options = SweepOptions(
        lrs=[0.1, 0.01], epochs=3, batch_size=16, memory_budget=BUDGET, progress=False,
        scheduler=cluster.scheduler_address,
    )  # fmt: skip
    out = tmp_path / "killed"
    run_sweep(store, out, options)
    killer.join()
    assert killed, "no worker was busy to kill"
    doc = _assert_same_run(one_process, out)
    # every part finished in a live process: the killed one's part was run again elsewhere
    assert all(not p["worker"].endswith(f":{killed['pid']}") for p in doc["cluster"]["parts"])


def test_a_part_given_the_sweep_order_sees_the_sweep_batches(store):
    features = ["t090_b19_avg1", "t090_b19_tok2", "t150_b24_avg1", "t150_b24_tok2"]
    whole = ProbeData.from_store(store, features, memory_budget=BUDGET)
    part = ProbeData.from_store(store, features[2:], memory_budget=BUDGET, order_units=whole.order_units())
    alone = ProbeData.from_store(store, features[2:], memory_budget=BUDGET)
    assert alone.order_units() != whole.order_units()  # the window is sized from the features read together
    for data in (part, alone):
        assert data.rows("train").tolist() == whole.rows("train").tolist()
    from probe.stream import FeatureStream

    def orders(data: ProbeData) -> list[list[int]]:
        stream = FeatureStream(data, "train", 16, shuffle=True)
        stream.set_epoch(1)
        return [w.order.tolist() for w in stream.windows()]

    assert orders(part) == orders(whole)
    assert orders(alone) != orders(whole)


def test_plan_parts_balances_bytes_and_keeps_the_sweep_order():
    sizes = {"a": 4, "b": 1, "c": 1, "d": 4, "e": 2}
    parts = plan_parts(sizes, 2)
    assert sorted(sum(sizes[f] for f in p) for p in parts) == [6, 6]
    assert sorted(f for p in parts for f in p) == sorted(sizes)
    assert all(p == sorted(p) for p in parts)
    assert plan_parts({"a": 1}, 4) == [["a"]]


def test_bad_cluster_options_are_refused_before_any_data_is_read(store, tmp_path):
    result = CliRunner().invoke(
        main, ["probe", "sweep", store, "--out", str(tmp_path / "x"), "--workers", "2", "--scheduler", "tcp://h:1"]
    )
    assert result.exit_code == 2 and "not both" in result.output
    with pytest.raises(ValueError, match="at least 1"):
        run_sweep(store, tmp_path / "y", SweepOptions(workers=0))
    assert not (tmp_path / "y").exists()
