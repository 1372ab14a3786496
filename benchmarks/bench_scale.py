"""Scale benchmark: how store operations grow with rows and with feature count, local and on S3.

Synthetic stores are written through the store's own writer (`create_store` + `StoreWriter.write_unit`): the
real layout, chunk checksums, progress markers and units; no U-Net. Cases:

- rows_<N>: one float16 feature t090_b24_avg2 of 1,024 x 2 x 2 (8 KiB a row), 1,000 classes, N rows;
- tok_<N>: one float16 token feature t090_b24_tok16 of C x 16 x 16 (C = --tok-channels, 128: 64 KiB a row);
- width: 1,110 features (37 blocks x 10 timesteps x avg1/avg2/avg4 of 8 channels) at 10,000 rows; the same
  store is written to moto's S3 server (127.0.0.1) and its operations repeated there, HTTP requests counted.

Each operation runs in a process of its own (this script with --op), so its peak RSS (`os.wait4`) is its own:
write; open_store + info (`diffbank store info`'s data); verify; verify --full; read -> float32 (window by
window into one reused buffer, as a probe or an export reads); one iter_batches pass (batch 256); a streamed
probe epoch against np.load of the same data (`epoch`: below); one epoch of `diffbank probe linear
--memory-budget 1GB` (1,000 classes). Each store is deleted once measured.

`epoch` writes the feature's float16 rows beside the store as .npy files, then times in paired rounds, in one
process: np.load of the .npy files (into fresh memory, as a program that loads its features does; files of at
most 1 GiB, one held at a time), the same files read window by window into one reused buffer (the stricter
reference: no fresh pages), and one shuffled epoch of the train split streamed as `diffbank probe` reads it
(`FeatureStream` over `ProbeData`, batch 256, --memory-budget 1GB: read, checked for NaN/inf, standardised,
shuffled within windows). GB/s counts float16 bytes (the epoch: those of its train rows); the percentages are
the median over rounds of epoch GB/s / np.load GB/s in the same round.

Times per row (rows cases) or per feature (width) sit side by side; `--json` writes every figure.

    python benchmarks/bench_scale.py [--sizes rows_10000,rows_100000,tok_50000,width] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROW_FEATURE = "t090_b24_avg2"
TOK_FEATURE = "t090_b24_tok16"
CLASSES = 1000
FULL_SIZES = ["rows_10000", "rows_100000", "rows_1280000", "tok_50000", "width"]
QUICK_SIZES = ["rows_2000", "rows_6000", "tok_600", "width_18"]
OPS = ["write", "info", "verify", "verify_full", "read", "iter", "epoch", "probe"]
S3_OPS = ["info", "verify", "read"]
COUNT_PATH = "/__bench_requests__"
NPY_PART_BYTES = 1 << 30  # the epoch's np.load reference: .npy files of at most 1 GiB


# -- cases --------------------------------------------------------------------------------


def case_of(size: str, quick: bool, tok_channels: int) -> dict[str, Any]:
    """What a size names: rows, classes, and each feature's (name, shape)."""
    case = _case_of(size, quick, tok_channels)
    # Too few rows for 1,000 classes to reach every split: --quick runs 20.
    return case | {"classes": 20 if quick else CLASSES}


def _case_of(size: str, quick: bool, tok_channels: int) -> dict[str, Any]:
    kind, _, count = size.partition("_")
    if kind == "rows":
        return {"size": size, "rows": int(count), "features": [[ROW_FEATURE, [1024, 2, 2]]]}
    if kind == "tok":
        return {"size": size, "rows": int(count), "features": [[TOK_FEATURE, [tok_channels, 16, 16]]]}
    if kind == "width":
        feats = [
            [f"t{t:03d}_b{b:02d}_avg{p}", [8, p, p]] for t in range(0, 100, 10) for b in range(37) for p in (1, 2, 4)
        ]
        return {"size": size, "rows": 500 if quick else 10_000, "features": feats[: int(count or len(feats))]}
    raise SystemExit(f"unknown size {size!r}: rows_N, tok_N, width or width_F (the first F of its 1,110 features)")


def layout_of(case: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Balanced labels in a seeded order, and a stratified split: each class's every tenth row is test."""
    n, classes = case["rows"], case["classes"]
    labels = np.random.default_rng(0).permutation(np.arange(n) % classes)
    rank = np.empty(n, np.int64)  # a row's position among the rows of its class
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], labels[order])
    rank[order] = np.arange(n) - starts
    test = rank % 10 == 0
    return labels, {"train": ~test, "test": test}


# -- operations (each run in its own process) -----------------------------------------------


def random_float16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float16 drawn 4,096 rows at a time: no float32 copy of a whole shard."""
    out = np.empty(shape, np.float16)
    for lo in range(0, shape[0], 4096):
        out[lo : lo + 4096] = rng.standard_normal((min(shape[0], lo + 4096) - lo, *shape[1:]), dtype=np.float32)
    return out


def class_means(rng: np.random.Generator, classes: int, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Per-class offsets (classes, *shape) in a random 16-d subspace, each coordinate there `strength` times the
    noise's standard deviation: a learnable class signal for a probe (noise alone leaves its top-1 at chance)."""
    dim = int(np.prod(shape))
    basis = np.linalg.qr(rng.standard_normal((dim, min(16, dim))))[0].T  # orthonormal rows
    means = rng.standard_normal((classes, len(basis))) * strength
    return (means @ basis).reshape(classes, *shape).astype(np.float32)


def op_write(url: str, case: dict[str, Any], signal: dict[str, float] | None = None) -> dict[str, Any]:
    """Write `case`'s store: float16 noise per feature, plus class means of strength `signal[name]`
    (`class_means`) for the features it names."""
    from extract.features import parse_feature_name
    from extract.store.create import NewStore, create_store
    from extract.store.layout import FeatureInfo

    infos = []
    for name, shape in case["features"]:
        key = parse_feature_name(name)
        infos.append(
            FeatureInfo(
                name=name,
                channels=shape[0],
                shape=tuple(shape),
                dtype="float16",
                t=key.t,
                block=key.block,
                module=None,
                resolution=None,
                pool_kind=key.pool_kind,
                pool_size=key.pool_size,
                view=key.view,
            )
        )
    labels, splits = layout_of(case)
    t0 = time.perf_counter()
    spec = {"kind": "bench_scale", "size": case["size"]}
    new = NewStore(
        num_samples=case["rows"],
        features=infos,
        spec=spec,
        labels=labels,
        splits=splits,
        class_names=[f"c{i}" for i in range(case["classes"])],
        shard_rows=case.get("shard_rows"),  # None: the store's own plan
    )
    writer = create_store(url, new)
    created = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    generate = write = 0.0
    pool: dict[str, np.ndarray] = {}
    offsets = {name: class_means(rng, case["classes"], tuple(shape), (signal or {}).get(name, 0.0))
               for name, shape in case["features"] if (signal or {}).get(name)}  # fmt: skip
    try:
        for unit in range(writer.num_units):
            start, stop = writer.unit_rows(unit)
            g0 = time.perf_counter()
            arrays = {}
            for name, shape in case["features"]:
                # One random block per feature, rolled per unit: incompressible data without a generator pass each unit.
                if name not in pool:
                    pool[name] = random_float16(rng, (writer.unit_rows(0)[1], *shape))
                arrays[name] = np.roll(pool[name], unit, axis=0)[: stop - start]
                if name in offsets:
                    arrays[name] = (arrays[name] + offsets[name][labels[start:stop]]).astype(np.float16)
            w0 = time.perf_counter()
            generate += w0 - g0
            writer.write_unit(unit, arrays)
            write += time.perf_counter() - w0
        f0 = time.perf_counter()
        writer.finalize()
        finalize = time.perf_counter() - f0
    finally:
        writer.release()
    nbytes = case["rows"] * sum(2 * int(np.prod(s)) for _, s in case["features"])
    return {
        "seconds": created + write + finalize,
        "create_s": created,
        "write_units_s": write,
        "finalize_s": finalize,
        "generate_s": generate,
        "units": writer.num_units,
        "bytes": nbytes,
    }


def op_info(url: str, case: dict[str, Any]) -> dict[str, Any]:
    from extract.store.reader import open_store
    from extract.store.tools import info

    t0 = time.perf_counter()
    fs = open_store(url)
    names = fs.feature_names()
    t1 = time.perf_counter()
    described = info(fs)
    t2 = time.perf_counter()
    assert len(described["features"]) == len(case["features"]) == len(names)
    return {"seconds": t2 - t0, "open_s": t1 - t0, "info_s": t2 - t1}


def op_verify(url: str, case: dict[str, Any], full: bool = False) -> dict[str, Any]:
    from extract.store.verify import verify

    warm = warm_up(url) if full else 0.0
    t0 = time.perf_counter()
    report = verify(url, full_scan=full)
    seconds = time.perf_counter() - t0
    if not report.ok:
        raise SystemExit(f"verify found problems: {report.problems[:5]}")
    return {"seconds": seconds, "features": report.checked["features"], "warmup_s": warm}


def warm_up(url: str) -> float:
    """One row read before the clock starts: the decoder's first use imports torch (seconds on a busy machine),
    a fixed cost that would hide how the rest grows with rows."""
    from extract.store.reader import open_store

    t0 = time.perf_counter()
    fs = open_store(url)
    fs.read(fs.array_names()[0], slice(0, 1))
    return time.perf_counter() - t0


def op_read(url: str, case: dict[str, Any]) -> dict[str, Any]:
    """Every feature, window by window (64 MiB of float32 each) into one reused buffer."""
    from extract.store.reader import open_store

    warm = warm_up(url)
    fs = open_store(url)
    t0 = time.perf_counter()
    total = 0.0
    for name in fs.array_names():
        shape = fs.array(name).shape[1:]
        window = max(1, min(fs.num_samples, (64 << 20) // (4 * int(np.prod(shape)))))
        buf = np.empty((window, *shape), np.float32)
        for lo in range(0, fs.num_samples, window):
            hi = min(fs.num_samples, lo + window)
            out = fs.read(name, slice(lo, hi), out=buf[: hi - lo])
            total += float(out[0].flat[0])
    return {"seconds": time.perf_counter() - t0, "warmup_s": warm}


def op_iter(url: str, case: dict[str, Any]) -> dict[str, Any]:
    from extract.store.reader import open_store

    warm = warm_up(url)
    fs = open_store(url)
    t0 = time.perf_counter()
    rows = 0
    for name in fs.array_names():
        for batch in fs.iter_batches(name, 256):
            rows += len(batch)
    assert rows == fs.num_samples * len(case["features"])
    return {"seconds": time.perf_counter() - t0, "warmup_s": warm}


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def op_epoch(url: str, case: dict[str, Any]) -> dict[str, Any]:
    """A streamed shuffled probe epoch of the train split against np.load of the same float16 data."""
    import torch

    from extract.store.reader import open_store
    from probe.data import ProbeData
    from probe.stream import FeatureStream

    name = case["features"][0][0]
    fs = open_store(url)
    arr = fs.array(name)
    folder = Path(tempfile.mkdtemp(prefix="npy_", dir=None if "://" in url else os.path.dirname(url)))
    row_bytes = 2 * int(np.prod(arr.shape[1:]))
    try:
        # The rows as .npy files of at most NPY_PART_BYTES each: np.load of one fills fresh memory, as a program
        # that loads its features does, without holding 10 GB at once.
        part_rows = max(1, NPY_PART_BYTES // row_bytes)
        parts = []
        for start in range(0, fs.num_samples, part_rows):
            parts.append(folder / f"x{len(parts):03d}.npy")
            out = np.lib.format.open_memmap(
                parts[-1], "w+", np.float16, (min(part_rows, fs.num_samples - start), *arr.shape[1:])
            )
            step = max(1, (64 << 20) // row_bytes)
            for lo in range(0, len(out), step):
                out[lo : lo + step] = arr[start + lo : start + min(len(out), lo + step)]
            out.flush()
            del out
        data = ProbeData.from_store(fs, name, in_memory=False, memory_budget="1GB")
        data.stats(name)  # once per feature, not per epoch
        torch.ones(1).sum()  # torch's first use before the clock
        gb = fs.num_samples * row_bytes / 1e9
        split_gb = len(data.rows("train")) * row_bytes / 1e9
        window = np.empty((data.default_buffer_rows(), *arr.shape[1:]), np.float16)

        def np_load() -> None:
            for part in parts:
                np.load(part)

        def np_load_windows() -> None:
            for part in parts:
                m = np.load(part, mmap_mode="r")
                for lo in range(0, len(m), len(window)):
                    piece = m[lo : lo + len(window)]
                    window[: len(piece)] = piece

        def epoch() -> None:
            stream = FeatureStream(data, "train", 256, shuffle=True)
            stream.set_epoch(1)
            n = sum(len(y) for _, y in stream)
            assert n == len(data.rows("train"))

        arms = {"np.load": (np_load, gb), "np.load windows": (np_load_windows, gb), "epoch": (epoch, split_gb)}
        rounds = int(case.get("epoch_rounds") or max(1, min(3, 1_000_000 // case["rows"])))
        seconds: dict[str, list[float]] = {k: [] for k in arms}
        cpus: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(rounds):
            for key, (fn, _) in arms.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                fn()
                seconds[key].append(time.perf_counter() - t0)
                cpus[key].append(cpu_seconds() - c0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rates = {k: np.array([arms[k][1] / t for t in seconds[k]]) for k in arms}
    result: dict[str, Any] = {
        "seconds": float(np.median(seconds["epoch"])),
        "rounds": rounds,
        "train_rows": int(len(data.rows("train"))),
        "window_rows": int(len(window)),
        "npy_parts": len(parts),
        "arms": {
            k: {
                "seconds": seconds[k],
                "cpu_s": cpus[k],
                "gb": arms[k][1],
                "median_gb_per_s": float(np.median(rates[k])),
            }
            for k in arms
        },
    }
    for ref in ("np.load", "np.load windows"):
        result[f"percent_of_{ref.replace(' ', '_').replace('.', '_')}"] = float(
            np.median(rates["epoch"] / rates[ref]) * 100
        )
    return result


def op_probe(url: str, case: dict[str, Any]) -> dict[str, Any]:
    """One epoch of the CLI's linear probe (1,000 classes) under a 1 GB memory budget: read, train, evaluate."""
    from click.testing import CliRunner

    import probe.run  # noqa: F401  (imported before the clock starts, as torch is for the reads)
    from diffbank.cli import main

    # Beside the store: the driver removes that folder even when it kills this process at --timeout.
    out = tempfile.mkdtemp(prefix="probe_", dir=None if "://" in url else os.path.dirname(url))
    name = case["features"][0][0]
    args = ["probe", "linear", url, "--out", out, "--feature", name, "--epochs", "1", "--memory-budget", "1GB"]
    try:
        t0 = time.perf_counter()
        result = CliRunner().invoke(main, [*args, "--quiet"], catch_exceptions=False)
        seconds = time.perf_counter() - t0
        if result.exit_code:
            raise SystemExit(f"probe linear failed ({result.exit_code}): {result.output[-2000:]}")
        recorded = json.loads((Path(out) / "results.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": seconds,
        "data_mode": recorded.get("data_mode"),
        "timings": recorded.get("timings"),
        "budget_bytes": 10**9,
    }


def requests_served(endpoint: str | None) -> int | None:
    if not endpoint:
        return None
    with urllib.request.urlopen(endpoint + COUNT_PATH, timeout=10) as reply:
        return int(reply.read())


def run_op(op: str, url: str, case: dict[str, Any]) -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3://") else None
    before = requests_served(endpoint)
    fn = {
        "write": op_write,
        "info": op_info,
        "verify": op_verify,
        "verify_full": lambda u, c: op_verify(u, c, full=True),
        "read": op_read,
        "iter": op_iter,
        "epoch": op_epoch,
        "probe": op_probe,
    }[op]
    result = fn(url, case)
    if endpoint:
        result["requests"] = requests_served(endpoint) - before
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; getrusage's ru_maxrss would keep the
    high-water mark of the forked parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the driver ---------------------------------------------------------------------------


def child(op: str, url: str, case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one operation in a fresh process; its result with its wall time and its own peak RSS."""
    cmd = [sys.executable, __file__, "--op", op, "--url", url, "--case", json.dumps(case)]
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                return {"error": f"timed out after {timeout:.0f} s"}
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code:
        return {"error": f"exit {code}: {text[-1500:]}"}
    result = json.loads(text.strip().splitlines()[-1])
    result.update(process_s=wall, cpu_s=usage.ru_utime + usage.ru_stime)
    return result


def measure(size: str, args: argparse.Namespace, base: Path, endpoint: str | None) -> dict[str, Any]:
    case = case_of(size, args.quick, args.tok_channels)
    ops = [o for o in args.ops.split(",") if o]
    if size.startswith("tok"):
        ops = [o for o in ops if o not in ("probe", "epoch")]
    if size.startswith("width"):
        ops = [
            o for o in ops if o != "epoch"
        ]  # the streamed epoch is a question of rows  # a linear head on 32k dims x 1,000 classes: hours of CPU
    results: dict[str, Any] = {"rows": case["rows"], "features": len(case["features"]), "local": {}}
    url = str(base / f"{size}.zarr")
    try:
        for op in ops:
            results["local"][op] = child(op, url, case, args.timeout)
            print(f"{size:>14} {op:>12}: {_brief(results['local'][op])}", flush=True)
            if op == "write" and "error" in results["local"][op]:
                break
        if endpoint and size.startswith("width") and "error" not in results["local"].get("write", {"error": 1}):
            results["s3"] = measure_s3(url, size, case, args.timeout)
    finally:
        shutil.rmtree(url, ignore_errors=True)
    return results


def measure_s3(url: str, size: str, case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The local store uploaded object by object (moto takes ~1 s a feature through the writer), then read there."""
    import s3fs

    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"bench-scale-{os.getpid()}-{size.replace('_', '-')}"
    s3.mkdir(bucket)
    s3_url = f"s3://{bucket}/{size}.zarr"
    t0 = time.perf_counter()
    before = requests_served(os.environ["AWS_ENDPOINT_URL"])
    s3.put(url, s3_url, recursive=True)
    out = {"upload": {"seconds": time.perf_counter() - t0, "peak_rss_mb": 0.0}}
    out["upload"]["requests"] = requests_served(os.environ["AWS_ENDPOINT_URL"]) - before
    print(f"{size + ' s3':>14} {'upload':>12}: {_brief(out['upload'])}", flush=True)
    for op in S3_OPS:
        out[op] = child(op, s3_url, case, timeout)
        print(f"{size + ' s3':>14} {op:>12}: {_brief(out[op])}", flush=True)
    s3.rm(bucket, recursive=True)
    return out


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return r["error"].splitlines()[0] if r["error"] else "error"
    extra = f", {r['requests']} requests" if "requests" in r else ""
    for ref in ("np_load", "np_load_windows"):
        if f"percent_of_{ref}" in r:
            extra += f", {r[f'percent_of_{ref}']:.0f}% of {ref.replace('np_load', 'np.load').replace('_', ' ')}"
    return f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB{extra}"


def start_s3() -> tuple[str, Any]:
    """moto's S3 app behind a counting WSGI layer on 127.0.0.1: GET COUNT_PATH answers the requests served."""
    import logging
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    served = [0]
    lock = threading.Lock()

    def counting(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == COUNT_PATH:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(served[0]).encode()]
        with lock:
            served[0] += 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    return endpoint, server


TABLE_OPS = ["upload", "write", "info", "verify", "verify_full", "read", "iter", "epoch", "probe"]


def table(results: dict[str, Any]) -> str:
    """Per operation: microseconds per row (rows/tok cases; width stores: milliseconds per feature, the probe of
    their one feature in seconds), peak RSS and, on S3, requests."""
    sizes = list(results["sizes"])
    head = f"{'operation':<12}" + "".join(f"{s:>28}" for s in sizes)
    lines = [head, f"{'':<12}" + "".join(f"{'per row|feature, RSS':>28}" for _ in sizes)]
    for where in ("local", "s3"):
        for op in TABLE_OPS:
            cells = []
            present = False
            for s in sizes:
                r = results["sizes"][s].get(where, {}).get(op)
                if r is None:
                    cells.append(f"{'-':>28}")
                    continue
                present = True
                if "error" in r:
                    cells.append(f"{'error':>28}")
                    continue
                entry = results["sizes"][s]
                if op == "epoch":
                    per = f"{r.get('percent_of_np_load', r.get('percent_of_np_load_windows', 0)):.0f}% np.load"
                elif s.startswith("width") and op == "probe":  # one feature's probe, whatever the store's width
                    per = f"{r['seconds']:.1f} s"
                elif s.startswith("width"):
                    per = f"{1e3 * r['seconds'] / entry['features']:.2f} ms/f"
                else:
                    per = f"{1e6 * r['seconds'] / entry['rows']:.2f} us/row"
                req = f" {r['requests']}req" if "requests" in r else ""
                rss = f" {r['peak_rss_mb']:.0f}MB" if r.get("peak_rss_mb") else ""  # the upload runs in the driver
                cells.append(f"{per + rss + req:>28}")
            if present:
                lines.append(f"{(op if where == 'local' else op + ' s3'):<12}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help=f"comma-separated cases (default {','.join(FULL_SIZES)})")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated operations to measure")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({','.join(QUICK_SIZES)}), seconds")
    parser.add_argument("--json", type=Path, help="write the results here (merged into an existing file)")
    parser.add_argument("--dir", type=Path, help="where stores are written (default: a temporary directory)")
    parser.add_argument("--tok-channels", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per operation")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--op", choices=OPS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.op:
        print(json.dumps(run_op(args.op, args.url, json.loads(args.case))))
        return
    sizes = (args.sizes or ",".join(QUICK_SIZES if args.quick else FULL_SIZES)).split(",")
    endpoint, server = (None, None) if args.no_s3 or not any(s.startswith("width") for s in sizes) else start_s3()
    base = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.dir))
    results: dict[str, Any] = {"sizes": {}}
    if args.json and args.json.exists():  # sizes run separately land in one file
        results = json.loads(args.json.read_text())
    results.update(
        machine={"cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS")},
        quick=args.quick,
    )
    try:
        for size in sizes:
            results["sizes"][size] = measure(size, args, base, endpoint)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if server is not None:
            server.shutdown()
    print(table(results))


if __name__ == "__main__":
    main()
