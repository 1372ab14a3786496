"""The resolved spec: frozen values with every default filled in, and what follows from them.

`Spec.to_dict()` is the recorded form (timesteps and blocks sorted, blocks named by number,
pooling/tokens expanded per block, the model flags replaced by the full resolved network flags);
loading it again gives the same spec and the same fingerprint. The fingerprint is the sha256 of its
canonical JSON without the run-only settings (compute.batch_size, compute.device,
compute.num_workers) and without `name`: none of those changes a byte of the store.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from extract.features import FeatureKey, pool_label
from extract.idx import FASHION_MNIST_DIR
from extract.provenance import fingerprint
from extract.spec.schema import COMPUTE_OPTION_DEFAULTS, DEFAULT_NOISE_RULE, SPEC_VERSION
from extract.storage import itemsize

# Settings that change how fast a store is written, never what is in it.
RUN_ONLY_SETTINGS = (("compute", "batch_size"), ("compute", "device"), ("compute", "num_workers"))
KNOWN_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "idx": {"train": 60000, "test": 10000},
    "digits": {"train": 1438, "test": 359},  # extract.sources: every fifth digit (i % 5 == 4) is test
}


def resolve_path(path: str, base_dir: str) -> Path:
    """`path` as written in a spec: `~` expanded, relative paths taken from the spec's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def is_default_fmnist(path: str | None) -> bool:
    return path is not None and os.path.normpath(path) == os.path.normpath(FASHION_MNIST_DIR)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    preset: str | None
    flags: Mapping[str, Any]  # the full resolved network flags (ADMConfig.to_flags())
    checkpoint: str | None  # as written: a path, "embedded:<name>", or None (random weights)
    init_seed: int
    noise_schedule: str
    diffusion_steps: int
    # diffusers: `flags` holds the UNet's config.json, `scheduler` its scheduler config (None: the
    # noise_schedule / diffusion_steps pair), `class_label` the class a class-conditional UNet gets (or
    # "dataset": each row's own label).
    family: str = "adm"
    path: str | None = None
    scheduler: Mapping[str, Any] | None = None
    class_label: int | str | None = None

    @property
    def image_size(self) -> int:
        return int(self.flags["image_size" if self.family == "adm" else "sample_size"])

    def section(self) -> dict[str, Any]:
        """The recorded `model:` section (ADM's keys unchanged, so older stores keep their fingerprint)."""
        if self.family != "adm":
            out: dict[str, Any] = {"family": self.family, "path": self.path}
            return out | ({"class_label": self.class_label} if self.class_label is not None else {})
        return {
            "preset": self.preset,
            "flags": dict(self.flags),
            "checkpoint": self.checkpoint,
            "init_seed": self.init_seed,
            "noise_schedule": self.noise_schedule,
            "diffusion_steps": self.diffusion_steps,
        }


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    kind: str
    path: str | None  # as written (idx: the default folder filled in)
    splits: tuple[str, ...] | None  # None: every split the source has
    limit: int | Mapping[str, int] | None  # first n rows per split
    image_size: int
    preprocess: str
    base_dir: str = dataclasses.field(default=".", compare=False, repr=False)

    def resolved_path(self) -> Path | None:
        return None if self.path is None else resolve_path(self.path, self.base_dir)

    def limit_for(self, split: str) -> int | None:
        if self.limit is None or isinstance(self.limit, int):
            return self.limit
        return self.limit.get(split)


@dataclasses.dataclass(frozen=True)
class FeatureGrid:
    """The `features:` section: timesteps x blocks, and the pooling of each block."""

    timesteps: tuple[int, ...]  # sorted
    blocks: tuple[int, ...]  # sorted paper numbers
    pooling: Mapping[int, tuple[int, ...]]  # block -> average-pool sizes (may be empty)
    tokens: Mapping[int, int]  # block -> token size s (blocks without token features absent)


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    seed: int
    draws: int
    combine: str = "mean"
    rule: str = DEFAULT_NOISE_RULE

    @property
    def stored_draws(self) -> int:
        """Arrays per feature: K when the draws are kept apart, 1 when they are averaged."""
        return self.draws if self.combine == "separate" else 1

    def as_dict(self) -> dict[str, Any]:
        # Defaults (combine "mean", the default rule) are left out, so stores written before either
        # existed keep their resolved form and fingerprint (and stay resumable).
        out = dataclasses.asdict(self)
        if out["combine"] == "mean":
            out.pop("combine")
        if out["rule"] == DEFAULT_NOISE_RULE:
            out.pop("rule")
        return out


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    center: bool
    hflip: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, on in (("center", self.center), ("flip", self.hflip)) if on)


@dataclasses.dataclass(frozen=True)
class StorageSpec:
    dtype: str
    compressor: str
    chunk_rows: int
    shard_rows: int | None  # None: the store picks (a multiple of chunk_rows)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class ComputeSpec:
    dtype: str
    batch_size: int
    device: str
    num_workers: int
    channels_last: bool = COMPUTE_OPTION_DEFAULTS["channels_last"]
    compile: bool = COMPUTE_OPTION_DEFAULTS["compile"]
    deterministic: bool = COMPUTE_OPTION_DEFAULTS["deterministic"]

    def as_dict(self) -> dict[str, Any]:
        # Options at their defaults are left out, so stores written before they existed keep their fingerprint.
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if k not in COMPUTE_OPTION_DEFAULTS or v != COMPUTE_OPTION_DEFAULTS[k]}


@dataclasses.dataclass(frozen=True)
class Feature:
    """One store array: a (timestep, block, pooling, view) with its per-sample shape."""

    t: int
    block: int
    module: str
    channels: int
    resolution: int  # the block's map side (H = W) at the dataset's image size
    pool_kind: str  # 'avg' | 'tok'
    pool_size: int
    view: str  # 'center' | 'flip'
    draw: int = 0  # which noise draw this array holds (combine: separate); 0 otherwise
    draws: int = 1  # arrays per feature: K for combine: separate, else 1

    @property
    def pool(self) -> str:
        return pool_label(self.pool_kind, self.pool_size)

    @property
    def key(self) -> FeatureKey:
        return FeatureKey(self.t, self.block, self.pool, self.view, self.draw)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.key.shape(self.channels, self.resolution)

    @property
    def name(self) -> str:
        return self.key.name

    def nbytes(self, itemsize: int) -> int:
        """Bytes of one sample's feature."""
        c, h, w = self.shape
        return c * h * w * itemsize

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "pool": self.pool, "shape": list(self.shape), "name": self.name}


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    model: ModelSpec
    dataset: DatasetSpec
    grid: FeatureGrid  # the YAML `features:` section (`features()` lists the resolved features)
    noise: NoiseSpec
    views: ViewSpec
    storage: StorageSpec
    compute: ComputeSpec
    # Tappable blocks at the dataset's image size, computed from the flags at load time (extract.models.config).
    block_table: tuple[Any, ...] = dataclasses.field(default=(), compare=False, repr=False)

    # -- resolved views --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec: JSON-able, every default filled, loadable again by `load_spec`."""
        m, d, g = self.model, self.dataset, self.grid
        return {
            "version": SPEC_VERSION,
            "name": self.name,
            "model": m.section(),
            "dataset": {
                "kind": d.kind,
                "path": d.path,
                "splits": list(d.splits) if d.splits is not None else None,
                "limit": dict(d.limit) if isinstance(d.limit, Mapping) else d.limit,
                "image_size": d.image_size,
                "preprocess": d.preprocess,
            },
            "features": {
                "timesteps": list(g.timesteps),
                "blocks": list(g.blocks),
                "pooling": {str(b): list(g.pooling[b]) for b in g.blocks},
                "tokens": {str(b): g.tokens[b] for b in g.blocks if b in g.tokens},
            },
            "noise": self.noise.as_dict(),
            "views": dataclasses.asdict(self.views),
            "storage": dataclasses.asdict(self.storage),
            "compute": self.compute.as_dict(),
        }

    def content_dict(self) -> dict[str, Any]:
        """`to_dict()` without what cannot change the store's bytes (the fingerprint's input)."""
        out = self.to_dict()
        out.pop("name")
        for section, key in RUN_ONLY_SETTINGS:
            out[section].pop(key)
        return out

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.content_dict())

    def model_block_table(self) -> tuple[Any, ...]:
        """`BlockInfo(number, module, channels, resolution)` of every block, at the dataset's image size."""
        return self.block_table

    def features(self) -> list[Feature]:
        """Every store array, ordered by timestep, block, pooling kind and size, view, noise draw."""
        table = {b.number: b for b in self.block_table}
        out = []
        for t in self.grid.timesteps:
            for number in self.grid.blocks:
                info = table[number]
                pools = [("avg", p) for p in self.grid.pooling[number]]
                if number in self.grid.tokens:
                    pools.append(("tok", self.grid.tokens[number]))
                k = self.noise.stored_draws
                for kind, size in pools:
                    for view in self.views.names:
                        for draw in range(k):
                            out.append(
                                Feature(
                                    t, number, info.module, info.channels, info.resolution, kind, size, view, draw, k
                                )
                            )
        return out

    def bytes_per_sample(self) -> int:
        """Σ over features of C·h·w·itemsize (timesteps, views and separate noise draws are arrays of their own)."""
        return sum(f.nbytes(self.storage.itemsize) for f in self.features())

    def estimated_bytes(self, n_samples: int) -> int:
        """Uncompressed store size: N · Σ C·p²·itemsize · |T| · views · K, where K is the number of noise
        draws when they are stored apart (combine: separate) and 1 when they are averaged."""
        return int(n_samples) * self.bytes_per_sample()

    def forwards_per_image(self) -> int:
        """U-Net forwards one image costs: |T| · K draws · views, whether the draws are averaged or kept."""
        return len(self.grid.timesteps) * self.noise.draws * len(self.views.names)

    def cost_summary(self, n_samples: int | None) -> str:
        """One line on what a run will cost, said before any work starts."""
        n = "N" if n_samples is None else f"{int(n_samples):,}"
        draws = self.noise.draws
        how = {"mean": "averaged into one array", "separate": "each stored as its own array"}[self.noise.combine]

        def count(k: int, what: str) -> str:
            return f"{k} {what}{'s' if k != 1 else ''}"

        factors = [
            count(len(self.grid.timesteps), "timestep"),
            count(draws, "noise draw"),
            count(len(self.views.names), "view"),
        ]
        text = f"{count(self.forwards_per_image(), 'U-Net forward')} per image ({' x '.join(factors)}), {n} images"
        return text + (f"; the {draws} draws are {how}" if draws > 1 else "")

    def known_num_samples(self) -> int | None:
        """N without touching the data, where the source's size is fixed (digits, Fashion-MNIST)."""
        sizes = KNOWN_SPLIT_SIZES.get(self.dataset.kind)
        if sizes is None or (self.dataset.kind == "idx" and not is_default_fmnist(self.dataset.path)):
            return None
        splits = self.dataset.splits or tuple(sizes)
        total = 0
        for split in splits:
            n = sizes[split]
            cap = self.dataset.limit_for(split)
            total += n if cap is None else min(n, cap)
        return total

    @property
    def deepest_block(self) -> int:
        return max(self.grid.blocks)
