"""Reader benchmark: the project's reader against np.load of the same float16 feature, local and on S3.

One float16 feature of >= 500 MB (default 76,800 rows x 1024 x 2 x 2 = 629 MB) is written once as a
store (blosc-lz4, 64-row inner chunks, the project's defaults) and once as .npy; every arm then reads the
same data, each measured in this run (best of --repeat after a warm-up, page cache warm for all):

- np.load of the .npy (float16), and np.load followed by a torch cast to float32;
- plain zarr `arr[:]` (float16) and `to_dask().compute()`;
- FeatureStore.read -> float32 with the decode pool (default threads) and with one thread; in the paired rounds
  also with the presence check skipped (every shard optional), for the check's cost. Once a result
  is dropped, the next read reuses its memory (as in a loop over features or shards); the arm "into fresh
  memory" passes a new `out=` each time, as a process's first read; what the fresh float32 output alone
  costs (allocate and fill it), and the read into a caller's reused buffer (`out=`);
- a full pass of FeatureStore.iter_batches (batch 256) with read-ahead, and without it on one thread;
- a probe's epoch of data (`FeatureStream` over `ProbeData`, batch 256, streamed under `--budget`): shuffled windows read,
  checked for NaN/inf and standardised, in order and shuffled (GB/s counts the float16 bytes of the split it
  reads, so it compares with np.load of the same bytes); and, as when the feature fits the budget, the one-time
  load into memory and an epoch gathered from it;
- 200 random 64-row batches (a shuffled probe epoch's access) with 64- and 512-row inner chunks, and a
  full read of the 512-row store (the chunk-size choice recorded in extract/store/layout.py);
- on moto's S3 server (a separate process on 127.0.0.1): read and iter_batches with prefetch (8 requests
  in flight) and without (one thread, no read-ahead). moto answers a ranged GET by copying the whole object
  under a lock (real S3 serves the range), so 256 MiB shards would measure moto, not the reader: the S3 arms
  read the same data from a store with --s3-shard-mb shards (one full read of the default store is shown too).

GB/s = float16 bytes of the feature (uncompressed) / seconds. `cpu` is the least CPU time (user + system, all
threads) an arm took: on a shared machine wall times swing with other jobs, CPU time much less.

    OMP_NUM_THREADS=2 python benchmarks/bench_reader.py [--rows 76800] [--channels 1024] [--threads 2] [--no-s3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

NAME = "t090_b24_avg2"


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: unlike wall time, barely moved by other jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best(fn, repeat: int) -> tuple[float, float]:
    """(fastest wall seconds, least CPU seconds) over `repeat` runs after a warm-up."""
    if repeat == 0:  # one timed run, no warm-up (arms too slow to repeat)
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, cpu_seconds() - c0
    fn()  # warm-up: page cache, thread pools, imports
    times, cpus = [], []
    for _ in range(repeat):
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return min(times), min(cpus)


def make_data(rows: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((rows, channels, 2, 2), dtype=np.float16)
    step = 4096
    for lo in range(0, rows, step):  # float32 temporaries of one block only
        hi = min(rows, lo + step)
        out[lo:hi] = rng.standard_normal((hi - lo, channels, 2, 2), dtype=np.float32)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, endpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=76_800)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="paired rounds of np.load / read / epoch")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--budget", default="1GiB", help="memory budget of the probe-epoch arms (streams below 1.8 GB)")
    ap.add_argument("--s3-shard-mb", type=float, default=16.0, help="shard size of the store the S3 arms read")
    ap.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import zarr

    from extract.store import open_store, save_features
    from extract.store.presence import RequiredShards

    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name)
    data = make_data(args.rows, args.channels)
    gb = data.nbytes / 1e9
    labels = np.arange(args.rows) % 10
    splits = {"train": np.arange(args.rows)}
    t0 = time.perf_counter()
    save_features(root / "c64.zarr", {NAME: data}, labels, splits, chunk_rows=64)
    write_s = time.perf_counter() - t0
    save_features(root / "c512.zarr", {NAME: data}, labels, splits, chunk_rows=512)
    if not args.no_s3:
        shard_rows = max(64, int(args.s3_shard_mb * 2**20 / data[0].nbytes) // 64 * 64)
        save_features(root / "s3.zarr", {NAME: data}, labels, splits, chunk_rows=64, shard_rows=shard_rows)
    np.save(root / "x.npy", data)
    del data
    print(
        f"feature {NAME}: {args.rows} x {args.channels} x 2 x 2 float16 = {gb * 1000:.0f} MB; "
        f"store written in {write_s:.1f} s; torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, cores {os.cpu_count()}"
    )

    results: list[tuple[str, float]] = []
    record: dict = {"feature_gb": gb, "rows": args.rows, "torch_threads": torch.get_num_threads(), "arms": {}}

    def arm(label: str, fn, repeat: int = args.repeat) -> None:
        seconds, cpu = best(fn, repeat)
        results.append((label, seconds))
        record["arms"][label] = {"seconds": seconds, "gb_per_s": gb / seconds, "cpu_seconds": cpu}
        print(f"  {label:<62} {seconds:7.3f} s  {gb / seconds:6.2f} GB/s  cpu {cpu:6.3f} s", flush=True)

    local = open_store(root / "c64.zarr")
    single = open_store(root / "c64.zarr", workers=1)
    arr = local.array(NAME)
    npy = root / "x.npy"
    arm("np.load (.npy, float16)", lambda: np.load(npy))
    arm("np.load + torch cast to float32", lambda: torch.from_numpy(np.load(npy)).float())
    arm("plain zarr arr[:] (float16)", lambda: arr[:])
    arm("to_dask().compute() (float16)", lambda: local.to_dask(NAME).compute(), repeat=1)
    shape = (args.rows, *arr.shape[1:])
    arm(f"FeatureStore.read -> float32 ({local.workers} decode threads)", lambda: local.read(NAME))
    arm("FeatureStore.read -> float32 (1 thread)", lambda: single.read(NAME))
    arm("FeatureStore.read -> float32 into fresh memory", lambda: local.read(NAME, out=np.empty(shape, np.float32)))
    # What a fresh float32 result costs before any decoding: the kernel zeroes and maps every page on first
    # write (2x np.load's float16 bytes), and the read into a reused buffer is the decode alone.
    arm("fresh float32 output alone (np.empty + fill)", lambda: np.empty(shape, np.float32).fill(0))
    reused = np.empty(shape, np.float32)
    arm(
        f"FeatureStore.read -> float32 into a reused buffer (out=, {local.workers} threads)",
        lambda: local.read(NAME, out=reused),
    )

    def full_pass(fs, prefetch):
        def run():
            n = 0
            for batch in fs.iter_batches(NAME, 256, prefetch=prefetch):
                n += len(batch)
            assert n == args.rows

        return run

    arm("iter_batches full pass, batch 256, read-ahead", full_pass(local, 1))
    arm("iter_batches full pass, 1 thread, no read-ahead", full_pass(single, 0))

    from probe.data import ProbeData
    from probe.stream import FeatureStream

    # its own store handle, as `diffbank probe` has: windows reuse their memory, not the read arm's
    data = ProbeData.from_store(open_store(root / "c64.zarr"), NAME, in_memory=False, memory_budget=args.budget)
    data.stats(NAME)  # the statistics pass is once per feature, not per epoch
    split_gb = len(data.rows("train")) * arr.nbytes / args.rows / 1e9

    def probe_epoch(shuffle):
        def run():
            for _ in FeatureStream(data, "train", 256, shuffle=shuffle):
                pass

        return run

    def split_arm(label: str, fn, repeat: int = args.repeat) -> None:
        seconds, cpu = best(fn, repeat)
        results.append((label, seconds * gb / split_gb))  # as seconds for the whole feature's bytes
        record["arms"][label] = {"seconds": seconds, "gb_per_s": split_gb / seconds, "cpu_seconds": cpu}
        print(f"  {label:<62} {seconds:7.3f} s  {split_gb / seconds:6.2f} GB/s  cpu {cpu:6.3f} s", flush=True)

    for shuffle in (False, True):
        split_arm(f"probe epoch (FeatureStream over ProbeData, {'shuffled' if shuffle else 'in order'})", probe_epoch(shuffle))
    # What a probe does when the feature fits its budget (the default 25% of RAM here): load once, then gather.
    resident = ProbeData.from_store(open_store(root / "c64.zarr"), NAME, in_memory=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    resident.memory_arrays()
    load_s, load_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    record["arms"]["probe in memory: load (read, statistics, standardise)"] = {
        "seconds": load_s,
        "gb_per_s": gb / load_s,
        "cpu_seconds": load_cpu,
    }
    print(f"  {'probe in memory: load once (read, statistics, standardise)':<62} {load_s:7.3f} s", flush=True)
    for shuffle in (False, True):

        def resident_epoch(shuffle=shuffle, data=resident):
            for _ in FeatureStream(data, "train", 256, shuffle=shuffle):
                pass

        split_arm(f"probe epoch in memory ({'shuffled' if shuffle else 'in order'})", resident_epoch)
    del resident, resident_epoch  # 1.26 GB: not through the rounds below

    # On a shared machine one arm can catch a quiet moment the next one misses: paired rounds time the
    # goal's arms back to back, and the median of the per-round ratios is the figure to quote.
    # The presence check's cost: the same read with every unit's shard marked optional (the check skipped).
    unchecked = open_store(root / "c64.zarr")
    unchecked._cache[("required", NAME)] = RequiredShards(np.zeros(unchecked.num_units, bool), False)
    t0 = time.perf_counter()
    open_store(root / "c64.zarr").required_shards(NAME)
    print(f"  presence rules of a fresh handle (markers read once): {1000 * (time.perf_counter() - t0):.1f} ms")
    paired = {
        "np.load": lambda: np.load(npy),
        "read": lambda: local.read(NAME),
        "unchecked": lambda: unchecked.read(NAME),
        "fresh": lambda: local.read(NAME, out=np.empty(shape, np.float32)),
        "epoch": full_pass(local, 1),
        "probe": probe_epoch(True),
    }
    rounds = {k: [] for k in paired}
    cpus = {k: [] for k in paired}
    for _ in range(args.rounds):
        for key, fn in paired.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            rounds[key].append(time.perf_counter() - t0)
            cpus[key].append(cpu_seconds() - c0)
    base_t = np.array(rounds["np.load"])
    print(f"  paired rounds ({args.rounds}), median GB/s and median ratio to np.load in the same round; median CPU s:")
    record["paired"] = {}
    for key in paired:
        size = split_gb if key == "probe" else gb
        t = np.array(rounds[key]) * gb / size  # seconds for the whole feature's bytes
        record["paired"][key] = {
            "median_gb_per_s": gb / float(np.median(t)),
            "median_percent_of_np_load": float(np.median(base_t / t) * 100),
            "median_cpu_seconds": float(np.median(cpus[key])),
        }
        print(
            f"    {key:<8} {gb / np.median(t):6.2f} GB/s   {np.median(base_t / t) * 100:6.1f} % of np.load"
            f"   cpu {np.median(cpus[key]):6.3f} s"
        )

    check = np.median(np.array(rounds["unchecked"]) / np.array(rounds["read"])) * 100
    print(f"    read with the presence check runs at {check:.1f} % of the speed without it (median of paired rounds)")
    record["paired"]["read_vs_unchecked_percent"] = float(check)

    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(args.rows, 64, replace=False)) for _ in range(200)]
    wide = open_store(root / "c512.zarr")
    for label, fs in (("64-row chunks", local), ("512-row chunks", wide)):

        def random_batches(fs=fs):
            for rows in batches:
                fs.read(NAME, rows)

        seconds, _ = best(random_batches, 1)
        print(f"  200 random 64-row batches, {label:<33} {seconds:7.3f} s  {1000 * seconds / 200:6.2f} ms/batch")
        record.setdefault("random_64_row_batch_ms", {})[label] = 1000 * seconds / 200
    arm("FeatureStore.read -> float32, 512-row chunks", lambda: wide.read(NAME))

    if not args.no_s3:
        import s3fs

        proc, endpoint = start_moto()
        try:
            os.environ.update(
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT_URL=endpoint,
            )
            fs3 = s3fs.S3FileSystem()
            fs3.mkdir("bench")
            t0 = time.perf_counter()
            fs3.put(str(root / "c64.zarr"), "bench/c64.zarr", recursive=True)
            fs3.put(str(root / "s3.zarr"), "bench/s3.zarr", recursive=True)
            print(f"  (uploaded both stores to moto in {time.perf_counter() - t0:.1f} s, {endpoint})")
            big = open_store("s3://bench/c64.zarr")
            arm(f"S3 read -> float32, 256 MiB shards ({big.workers} in flight; moto-bound)", lambda: big.read(NAME), 0)
            remote = open_store("s3://bench/s3.zarr")
            remote_single = open_store("s3://bench/s3.zarr", workers=1)
            assert remote._root.metadata.consolidated_metadata is not None
            print(f"  S3 store below: shards of {remote.shard_rows} rows ({args.s3_shard_mb:g} MiB)")
            arm(f"S3 FeatureStore.read -> float32, prefetch ({remote.workers} in flight)", lambda: remote.read(NAME), 1)
            arm("S3 FeatureStore.read -> float32, no prefetch (1 thread)", lambda: remote_single.read(NAME), 1)
            arm("S3 iter_batches full pass, prefetch", full_pass(remote, 2), 1)
            arm("S3 iter_batches full pass, no prefetch", full_pass(remote_single, 0), 1)
            zarr_remote = zarr.open_array("s3://bench/s3.zarr/features/" + NAME, mode="r")
            arm("S3 plain zarr arr[:] (float16)", lambda: zarr_remote[:], 1)
        finally:
            proc.terminate()
            proc.wait()

    base = dict(results)["np.load (.npy, float16)"]
    print(f"\nrelative to np.load ({gb / base:.2f} GB/s):")
    for label, seconds in results:
        print(f"  {label:<62} {base / seconds * 100:6.1f} %")
        if label in record["arms"]:
            record["arms"][label]["percent_of_np_load"] = base / seconds * 100
    if args.json:
        record["load_average"] = os.getloadavg()
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
