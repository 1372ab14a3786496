"""The streamed probe epoch with the float16 -> float32 cast fused into the subtraction of the mean, against the
reader as it is, in paired rounds.

As it is, each decoded block of float16 rows is cast into a reused float32 buffer (torch `copy_`), then
standardised in place (`sub_` of the mean, `div_` by the std), checked for NaN/inf (one sum) and scattered into
the shuffled window. The alternatives fuse the cast into the subtraction, then divide in place:

- `torch_sub`: `torch.sub(float16 block, float32 mean, out=float32 buffer)`;
- `numpy_subtract`: `np.subtract(float16 block, float32 mean, out=float32 buffer, casting="unsafe")`.

Both give the same float32 bits as the reader (the cast is exact, then one rounded subtraction and one rounded
division): every arm's epoch is checked byte for byte against the reader's before any round is timed. The
alternatives are swapped in for the reader's cast and standardisation step while their arm runs.

The store is bench_scale's rows case (one float16 feature of 1,024 x 2 x 2, 8 KiB a row, blosc-lz4 + crc32c);
the epoch is bench_scale's `epoch` arm (`FeatureStream` over `ProbeData`, train split, batch 256, shuffled,
--memory-budget 1GB). CPU seconds are this process's user + system time, all threads, per epoch; the arms run
in alternating order round by round.

    python benchmarks/bench_standardise_cast.py [--rows 100000] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import case_of, op_write  # noqa: E402  (a sibling script, not a package)

from extract.store import decode  # noqa: E402
from extract.store.reader import open_store  # noqa: E402
from probe import stats as stats_module  # noqa: E402
from probe.data import ProbeData  # noqa: E402
from probe.stream import FeatureStream  # noqa: E402

ARMS = ("reader", "torch_sub", "numpy_subtract")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fused_cast(arm: str, mean: np.ndarray) -> Callable[[np.ndarray, np.ndarray], None]:
    """dst = float32(src) - mean, in one call."""
    mean_t = torch.from_numpy(mean)

    def torch_sub(dst: np.ndarray, src: np.ndarray) -> None:
        torch.sub(torch.from_numpy(src), mean_t, out=torch.from_numpy(dst))

    def numpy_subtract(dst: np.ndarray, src: np.ndarray) -> None:
        np.subtract(src, mean, out=dst, casting="unsafe")

    return torch_sub if arm == "torch_sub" else numpy_subtract


def _divide_only(self: stats_module.FeatureStats, x: np.ndarray) -> np.ndarray:
    torch.from_numpy(x).div_(torch.from_numpy(self.std))
    return x


@contextmanager
def arm_in_place(arm: str, mean: np.ndarray) -> Iterator[None]:
    """The reader's cast and standardisation, or `arm`'s fused cast + subtraction then division."""
    if arm == "reader":
        yield
        return
    cast, apply = decode.cast_into, stats_module.FeatureStats.apply
    decode.cast_into = _fused_cast(arm, mean)  # type: ignore[assignment]
    stats_module.FeatureStats.apply = _divide_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        decode.cast_into, stats_module.FeatureStats.apply = cast, apply  # type: ignore[method-assign]


def epoch(data: ProbeData, name: str, digest: bool = False) -> tuple[int, int]:
    """Rows of one shuffled train epoch, and the crc32 of its batches' bytes (with `digest`)."""
    stream = FeatureStream(data, "train", 256, shuffle=True)
    stream.set_epoch(1)
    rows, crc = 0, 0
    for xs, y in stream:
        rows += len(y)
        if digest:
            crc = zlib.crc32(xs[name].numpy().tobytes(), crc)
    return rows, crc


def measure(store: Path, rounds: int) -> dict[str, Any]:
    fs = open_store(store)
    name = fs.feature_names()[0]
    data = ProbeData.from_store(fs, name, in_memory=False, memory_budget="1GB")
    mean = data.stats(name).mean  # once, before any arm
    torch.ones(1).sum()
    digests = {}
    for arm in ARMS:
        with arm_in_place(arm, mean):
            digests[arm] = epoch(data, name, digest=True)
    if len(set(digests.values())) != 1:
        raise SystemExit(f"the arms' epochs differ: {digests}")
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            with arm_in_place(arm, mean):
                c0, t0 = cpu_seconds(), time.perf_counter()
                epoch(data, name)
                cpu[arm].append(cpu_seconds() - c0)
                wall[arm].append(time.perf_counter() - t0)
    rows = digests["reader"][0]
    return {
        "train_rows": rows,
        "rounds": rounds,
        "bytes_identical": True,
        "arms": {
            arm: {
                "cpu_s": cpu[arm],
                "wall_s": wall[arm],
                "median_cpu_s": float(np.median(cpu[arm])),
                "median_cpu_us_per_row": float(np.median(cpu[arm]) / rows * 1e6),
                "median_cpu_ratio_to_reader": float(np.median(np.array(cpu[arm]) / np.array(cpu["reader"]))),
            }
            for arm in ARMS
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_cast_") as tmp:
        store = Path(tmp) / "rows.zarr"
        op_write(str(store), case_of(f"rows_{args.rows}", False, 128))
        load = os.getloadavg()[0]
        result = measure(store, args.rounds)
        result["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before and after the rounds
    print(
        f"{result['train_rows']:,} train rows, {args.rounds} paired rounds, epochs byte-identical across arms, "
        f"load average {result['load_average_1min'][0]} -> {result['load_average_1min'][1]}"
    )
    print(f"{'arm':>16} {'CPU s/epoch':>12} {'us/row':>8} {'x reader (paired)':>18}")
    for arm, r in result["arms"].items():
        print(
            f"{arm:>16} {r['median_cpu_s']:>12.2f} {r['median_cpu_us_per_row']:>8.1f} "
            f"{r['median_cpu_ratio_to_reader']:>18.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
