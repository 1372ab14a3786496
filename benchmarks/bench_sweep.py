"""Sweep benchmark: 9 (t, block) features x 3 learning rates, one pass (`train_many`) vs 27 separate runs.

Both arms read from a Zarr store written by `extract.store.save_features` (float16, as caches usually are), so
the comparison includes decompression and casting; if the store module is unavailable the arrays are served
from memory instead and the output says so. The two arms see identical batches (same stream seeds) and start
from identical weights, so their selected accuracies must match exactly; only the wall time may differ.

    python benchmarks/bench_sweep.py [--samples 10000] [--epochs 3] [--classes 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from probe.heads import LinearHead, seeded_init
from probe.train import ArrayStream, train, train_many

TIMESTEPS = (60, 90, 150)
BLOCKS = {19: (512, 2, 2), 24: (256, 2, 2), 30: (128, 2, 2)}  # 2048-, 1024- and 512-d features
LRS = (1e-3, 1e-2, 5e-2)


class StoreStream:
    """A `BatchStream` over rows of a feature store: contiguous windows in shuffled order, rows shuffled inside.

    Windows keep reads chunk-friendly (random single rows would decompress a chunk per row); the order depends
    only on (seed, epoch), like `ArrayStream`.
    """

    def __init__(self, store, names: Sequence[str], rows: np.ndarray, labels: np.ndarray, batch_size: int,
                 shuffle: bool, seed: int, window_rows: int = 2048) -> None:
        self.store, self.names, self.rows = store, list(names), np.asarray(rows)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.batch_size, self.shuffle, self.seed, self.window_rows = batch_size, shuffle, seed, window_rows
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        starts = np.arange(0, len(self.rows), self.window_rows)
        if self.shuffle:
            starts = rng.permutation(starts)
        for start in starts:
            local = np.arange(start, min(start + self.window_rows, len(self.rows)))
            rows = self.rows[local]  # split rows are sorted and contiguous here: one slice read per feature
            block = {n: self.store.read(n, slice(int(rows[0]), int(rows[-1]) + 1)) for n in self.names}
            order = rng.permutation(len(local)) if self.shuffle else np.arange(len(local))
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo:lo + self.batch_size]
                yield {n: torch.from_numpy(block[n][idx]) for n in self.names}, self.labels[local[idx]]


def synthetic(n: int, classes: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features whose class signal (a random low-dim subspace) is strongest at t=90, block 24."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    feats = {}
    for t in TIMESTEPS:
        for b, shape in BLOCKS.items():
            d = int(np.prod(shape))
            strength = 1.0 / (1 + abs(t - 90) / 60 + abs(b - 24) / 6)
            means = rng.normal(size=(classes, 16)) * strength * 0.35
            basis = np.linalg.qr(rng.normal(size=(d, 16)))[0]
            x = rng.normal(size=(n, d)).astype(np.float32) + (means[y] @ basis.T).astype(np.float32) * 3
            feats[f"t{t:03d}_b{b:02d}_avg2"] = x.reshape(n, *shape).astype(np.float16)
    return feats, y


def heads_for(names: Sequence[str], classes: int) -> dict[tuple[str, float], LinearHead]:
    heads = {}
    for i, name in enumerate(names):
        for lr in LRS:
            with seeded_init(i):  # same init for a feature in both arms
                heads[(name, lr)] = LinearHead(BLOCKS[int(name[6:8])], classes)
    return heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    feats, y = synthetic(args.samples, args.classes)
    names = sorted(feats)
    n_train = int(0.8 * args.samples)
    train_rows, val_rows = np.arange(n_train), np.arange(n_train, args.samples)
    tmp = tempfile.TemporaryDirectory()
    try:
        from extract.store import open_store, save_features
        t0 = time.perf_counter()
        save_features(f"{tmp.name}/bench.zarr", feats, y,
                      {"train": np.arange(args.samples) < n_train, "val": np.arange(args.samples) >= n_train})
        source = f"Zarr store (float16, written in {time.perf_counter() - t0:.1f}s)"

        def make(names_: Sequence[str]):
            store = open_store(f"{tmp.name}/bench.zarr")  # each run opens and reads the store itself
            return (StoreStream(store, names_, train_rows, y[train_rows], args.batch_size, True, 0),
                    StoreStream(store, names_, val_rows, y[val_rows], 1024, False, 0))
    except ImportError:
        source = "in-memory arrays (extract.store unavailable: I/O NOT included)"

        def make(names_: Sequence[str]):
            return (ArrayStream({n: feats[n][train_rows] for n in names_}, y[train_rows], args.batch_size, True, 0),
                    ArrayStream({n: feats[n][val_rows] for n in names_}, y[val_rows], 1024, False, 0))

    dims = sorted({int(np.prod(s)) for s in BLOCKS.values()})
    print(f"data: {source}; {args.samples} samples ({n_train} train), {len(names)} features of {dims} dims, "
          f"{len(LRS)} lrs, {args.epochs} epochs, batch {args.batch_size}, {args.threads} thread(s)")

    # Warm-up outside the timings: torch's first optimizer step imports its compiler stack (seconds).
    with seeded_init(0):
        warm = LinearHead(4, 2)
    train(warm, ArrayStream({"w": np.zeros((4, 4), np.float32)}, np.array([0, 1, 0, 1])), epochs=1, progress=False)

    heads = heads_for(names, args.classes)
    t0 = time.perf_counter()
    train_s, val_s = make(names)
    sweep = train_many(heads, {k: k[0] for k in heads}, train_s, val_s, lrs={k: k[1] for k in heads},
                       epochs=args.epochs, step_size=max(1, args.epochs - 1), progress=False)
    one_pass = time.perf_counter() - t0

    separate_heads = heads_for(names, args.classes)
    separate = {}
    t0 = time.perf_counter()
    for key, head in separate_heads.items():
        train_s, val_s = make([key[0]])
        separate[key] = train(head, train_s, val_s, input=key[0], lr=key[1], epochs=args.epochs,
                              step_size=max(1, args.epochs - 1), progress=False)
    separate_time = time.perf_counter() - t0

    best_sep = max(separate, key=lambda k: (separate[k].val_accuracy, -separate[k].val_loss))
    print(f"one pass (train_many, 27 heads): {one_pass:8.1f} s   selected {sweep.best}: "
          f"val acc {sweep.heads[sweep.best].val_accuracy:.4f}")
    print(f"27 separate runs:                {separate_time:8.1f} s   selected {best_sep}: "
          f"val acc {separate[best_sep].val_accuracy:.4f}")
    print(f"speed-up: {separate_time / one_pass:.2f}x (target >= 5x)")
    same = all(separate[k].history == sweep.heads[k].history for k in heads)
    print(f"identical per-head histories in both arms: {same}")
    print("best lr per feature:", {f: k[1] for f, k in sweep.best_per_input.items()})
    tmp.cleanup()


if __name__ == "__main__":
    main()
