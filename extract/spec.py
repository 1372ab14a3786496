"""The extraction spec: one declarative, validated description of a feature store.

A spec is read from YAML (or a dict), checked completely before any work starts, and resolved
into frozen dataclasses with every default filled in. Validation collects *every* problem and
raises one `SpecError` whose `.problems` lists them, each prefixed by its field path
(`features.timesteps[2]: 1000 is outside [0, 1000) ...`), so a user fixes a spec in one pass.

YAML schema (defaults in brackets; `null` where a default is derived)::

    name: cpu_small                      # [file stem] a label; not part of the fingerprint
    model:
      preset: 256x256_diffusion_uncond   # [null] a released preset, or "embedded:<name>"
      flags: {num_channels: 32, ...}     # [{}] guided-diffusion flag overrides on top of the preset
      checkpoint: path | "embedded:<name>" | null   # [null] null = random weights from init_seed
      init_seed: 0                       # [0]
      noise_schedule: linear | cosine    # [preset's, else linear]
      diffusion_steps: 1000              # [preset's, else 1000]
    dataset:
      kind: folder | csv | hdf5 | idx | digits
      path: data/imagenet                # required for folder/csv/hdf5; idx: [/usr/share/datasets/fashion-mnist];
                                         #   digits: must be null (sklearn's bundled 8x8 digits)
      splits: [train, test]              # [null] = every split the source has
      limit: 1000 | {train: 1000, test: 200}   # [null] keep the first n rows of each split, in source order
      image_size: 256                    # [model image_size] must be divisible by the U-Net's total downsampling
      preprocess: reference              # [reference] guided-diffusion's center_crop_arr (extract/preprocess.py)
    features:
      timesteps: [90, 150]               # 0-based indices of the diffusion_steps-step process
      blocks: [19, 24, "output_blocks.8"]   # paper numbering (1-based) or module names
      pooling: [2] | {default: [2], 24: [2, 4]}   # [{default: [2]}] average-pool sizes p (output p x p); [] = none
      tokens: 16 | {default: 16, 19: 8} | null    # [null] token mode: average-pool to at most s x s
    noise: {seed: 0, draws: 1}           # draws > 1: features averaged over that many noise draws
    views: {center: true, hflip: false}  # hflip adds a horizontally flipped second view ("_flip" features)
    storage: {dtype: float16, compressor: blosc-lz4, chunk_rows: 64, shard_rows: null}
                                         # dtype float16|float32; compressor blosc-lz4|zstd|none;
                                         # shard_rows null = chosen by the store; else a multiple of chunk_rows
    compute: {dtype: float32, batch_size: 32, device: auto, num_workers: 0}
                                         # dtype float32|bfloat16|float16; device auto|cpu|cuda[:N]|mps

Relative paths (dataset.path, model.checkpoint) are resolved against `base_dir`, by default the
current working directory, the way command-line tools treat paths; they are recorded as written so
the fingerprint does not depend on where a checkout lives.

The resolved form (`Spec.to_dict()`) sorts timesteps and blocks, names blocks by number, expands
pooling/tokens per block and replaces the model flags by the full resolved network flags; loading
it again gives the same spec and the same fingerprint. The fingerprint is the sha256 of its
canonical JSON without the run-only settings (compute.batch_size, compute.device,
compute.num_workers) and without `name`: none of those changes a byte of the store.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from extract.features import FeatureKey, feature_name, parse_feature_name, pool_label  # noqa: F401

SPEC_VERSION = 1

STORAGE_DTYPES: dict[str, int] = {"float16": 2, "float32": 4}  # name -> itemsize
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
COMPRESSORS = ("blosc-lz4", "zstd", "none")
DATASET_KINDS = ("folder", "csv", "hdf5", "idx", "digits")
PREPROCESSING = ("reference",)
SCHEDULES = ("linear", "cosine")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_POOLING = (2,)
# Settings that change how fast a store is written, never what is in it.
RUN_ONLY_SETTINGS = (("compute", "batch_size"), ("compute", "device"), ("compute", "num_workers"))

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class SpecError(ValueError):
    """A spec with problems; `.problems` lists every one, each starting with its field path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


# ---------------------------------------------------------------------------------------------
# The resolved spec
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    preset: str | None
    flags: Mapping[str, Any]  # the full resolved network flags (ADMConfig.to_flags())
    checkpoint: str | None  # as written: a path, "embedded:<name>", or None (random weights)
    init_seed: int
    noise_schedule: str
    diffusion_steps: int

    @property
    def image_size(self) -> int:
        return int(self.flags["image_size"])


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
        if self.path is None:
            return None
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

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
        return STORAGE_DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class ComputeSpec:
    dtype: str
    batch_size: int
    device: str
    num_workers: int


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

    @property
    def pool(self) -> str:
        return pool_label(self.pool_kind, self.pool_size)

    @property
    def key(self) -> FeatureKey:
        return FeatureKey(self.t, self.block, self.pool, self.view)

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
    # Tappable blocks at the dataset's image size, learnt from a meta-device model at load time.
    block_table: tuple[Any, ...] = dataclasses.field(default=(), compare=False, repr=False)

    # -- resolved views --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec: JSON-able, every default filled, loadable again by `load_spec`."""
        m, d, g = self.model, self.dataset, self.grid
        return {
            "version": SPEC_VERSION,
            "name": self.name,
            "model": {"preset": m.preset, "flags": dict(m.flags), "checkpoint": m.checkpoint,
                      "init_seed": m.init_seed, "noise_schedule": m.noise_schedule,
                      "diffusion_steps": m.diffusion_steps},
            "dataset": {"kind": d.kind, "path": d.path, "splits": list(d.splits) if d.splits is not None else None,
                        "limit": dict(d.limit) if isinstance(d.limit, Mapping) else d.limit,
                        "image_size": d.image_size, "preprocess": d.preprocess},
            "features": {"timesteps": list(g.timesteps), "blocks": list(g.blocks),
                         "pooling": {str(b): list(g.pooling[b]) for b in g.blocks},
                         "tokens": {str(b): g.tokens[b] for b in g.blocks if b in g.tokens}},
            "noise": dataclasses.asdict(self.noise),
            "views": dataclasses.asdict(self.views),
            "storage": dataclasses.asdict(self.storage),
            "compute": dataclasses.asdict(self.compute),
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
        return hashlib.sha256(canonical_json(self.content_dict()).encode()).hexdigest()

    def model_block_table(self) -> tuple[Any, ...]:
        """`BlockInfo(number, module, channels, resolution)` of every block, at the dataset's image size."""
        return self.block_table

    def features(self) -> list[Feature]:
        """Every store array, ordered by timestep, block, pooling kind and size, view."""
        table = {b.number: b for b in self.block_table}
        out = []
        for t in self.grid.timesteps:
            for number in self.grid.blocks:
                info = table[number]
                pools = [("avg", p) for p in self.grid.pooling[number]]
                if number in self.grid.tokens:
                    pools.append(("tok", self.grid.tokens[number]))
                for kind, size in pools:
                    for view in self.views.names:
                        out.append(Feature(t, number, info.module, info.channels, info.resolution, kind, size, view))
        return out

    def bytes_per_sample(self) -> int:
        """Σ over features of C·h·w·itemsize (timesteps and views are features of their own)."""
        return sum(f.nbytes(self.storage.itemsize) for f in self.features())

    def estimated_bytes(self, n_samples: int) -> int:
        """Uncompressed store size: N · Σ C·p²·itemsize · |T| · views (noise draws are averaged, not stored)."""
        return int(n_samples) * self.bytes_per_sample()

    def known_num_samples(self) -> int | None:
        """N without touching the data, where the source's size is fixed (digits, Fashion-MNIST)."""
        sizes = _KNOWN_SPLIT_SIZES.get(self.dataset.kind)
        if sizes is None or (self.dataset.kind == "idx" and not _is_default_fmnist(self.dataset.path)):
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

    def checkpoint_path(self) -> Path | None:
        """The checkpoint as a filesystem path (embedded names resolved); None for random weights."""
        c = self.model.checkpoint
        if c is None:
            return None
        if c.startswith(EMBEDDED_PREFIX):
            from extract.models.registry import resolve_checkpoint
            return resolve_checkpoint(c)
        p = Path(c).expanduser()
        return p if p.is_absolute() else Path(self.dataset.base_dir) / p


EMBEDDED_PREFIX = "embedded:"
_KNOWN_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "idx": {"train": 60000, "test": 10000},
    "digits": {"train": 1438, "test": 359},  # extract.sources: every fifth digit (i % 5 == 4) is test
}


def _is_default_fmnist(path: str | None) -> bool:
    return path is not None and os.path.normpath(path) == os.path.normpath(DEFAULT_FASHION_MNIST_DIR)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def load_spec(spec: str | os.PathLike | Mapping[str, Any], *, check_files: bool = True,
              base_dir: str | os.PathLike | None = None) -> Spec:
    """Read, validate and resolve a spec (a YAML path or a dict); raise `SpecError` listing every problem.

    `check_files=False` skips the existence checks of the checkpoint and the dataset, so a spec's
    resolution and size can be inspected before the files are at hand.
    """
    source: str | None = None
    if isinstance(spec, Mapping):
        raw: Any = spec
        default_name = "spec"
    else:
        import yaml

        path = Path(spec)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise SpecError([f"cannot read the spec file: {exc.strerror or exc}"], source) from None
        except yaml.YAMLError as exc:
            raise SpecError([f"not valid YAML: {exc}"], source) from None
        default_name = path.stem
    base = str(Path(base_dir) if base_dir is not None else Path.cwd())
    return _parse_spec(raw, default_name=default_name, base_dir=base, check_files=check_files, source=source)


def spec_only_adds(old_resolved: Mapping[str, Any], new: Spec | Mapping[str, Any]) -> list[Feature] | None:
    """The features `new` adds to a store written from `old_resolved` (a recorded `to_dict()`).

    None when the two differ in anything but added (t, block, pooling) features, or when the new
    spec drops one of the old features; [] when they describe the same features. Run-only settings
    and the name may differ.
    """
    try:
        old = load_spec(old_resolved, check_files=False)
    except SpecError:
        return None
    if not isinstance(new, Spec):
        new = load_spec(new, check_files=False)
    a, b = old.content_dict(), new.content_dict()
    a.pop("features")
    b.pop("features")
    if canonical_json(a) != canonical_json(b):
        return None
    old_names = {f.name for f in old.features()}
    new_features = new.features()
    if not old_names <= {f.name for f in new_features}:
        return None
    return [f for f in new_features if f.name not in old_names]


def extension_problem(old_resolved: Mapping[str, Any], new: Spec) -> str:
    """"" when `new` only adds features to a store written from `old_resolved`, else why not."""
    try:
        added = spec_only_adds(old_resolved, new)
    except Exception as exc:  # a spec it cannot compare is a spec we will not mix into this store
        return str(exc)
    if added is None:
        return "it changes more than the list of (timestep, block, pooling) features, or drops some"
    return ""


def fingerprint_of_resolved(resolved: Mapping[str, Any]) -> str | None:
    """The fingerprint of a recorded spec (`Spec.to_dict()`), or None when it no longer loads."""
    try:
        return load_spec(dict(resolved), check_files=False).fingerprint
    except SpecError:
        return None


@functools.lru_cache(maxsize=16)
def _block_table_cached(flags_json: str) -> tuple[Any, ...]:
    import torch

    from extract.models.adm import ADMUNet

    # On the meta device no memory is allocated and no weights are initialised: only shapes.
    with torch.device("meta"):
        model = ADMUNet.from_flags(**json.loads(flags_json))
    return model.blocks


def block_table_for_flags(flags: Mapping[str, Any]) -> tuple[Any, ...]:
    """The U-Net's blocks for these (resolved) flags, at the model's own image size."""
    return _block_table_cached(canonical_json(dict(flags)))


def suggest(word: str, choices: Any) -> str:
    """' (did you mean 'x'?)' when a choice is close to `word`, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Validation: every check appends to one list; nothing raises until all sections are read
# ---------------------------------------------------------------------------------------------

_MISSING: Any = object()
_REQUIRED: Any = object()

_SCHEMA: dict[str, dict[str, Any]] = {
    "model": {"preset": None, "flags": None, "checkpoint": None, "init_seed": 0, "noise_schedule": None,
              "diffusion_steps": None},
    "dataset": {"kind": _REQUIRED, "path": None, "splits": None, "limit": None, "image_size": None,
                "preprocess": "reference"},
    "features": {"timesteps": _REQUIRED, "blocks": _REQUIRED, "pooling": None, "tokens": None},
    "noise": {"seed": 0, "draws": 1},
    "views": {"center": True, "hflip": False},
    "storage": {"dtype": "float16", "compressor": "blosc-lz4", "chunk_rows": 64, "shard_rows": None},
    "compute": {"dtype": "float32", "batch_size": 32, "device": "auto", "num_workers": 0},
}
_TOP_KEYS = ("version", "name", *_SCHEMA)
_REQUIRED_SECTIONS = ("model", "dataset", "features")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Checker:
    """Collects problems as `path: message` and offers typed readers that never raise."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    def section(self, raw: Any, path: str, schema: Mapping[str, Any]) -> dict[str, Any]:
        """The section's values with defaults filled; unknown and missing keys reported."""
        absent = raw is _MISSING  # an absent required section is reported once, not key by key
        if raw is None or raw is _MISSING:
            raw = {}
        if not isinstance(raw, Mapping):
            self.add(path, f"expected a mapping, got {_type_name(raw)} {raw!r}")
            raw = {}
        self.unknown_keys(raw, path, schema)
        out = {}
        for key, default in schema.items():
            if key in raw:
                out[key] = raw[key]
            elif default is _REQUIRED:
                if not absent:
                    self.add(f"{path}.{key}", "is required")
                out[key] = _MISSING
            else:
                out[key] = default
        return out

    def unknown_keys(self, raw: Mapping[str, Any], path: str, allowed: Any) -> None:
        for key in raw:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.add(where, f"unknown key{suggest(key, allowed)}; allowed: {', '.join(map(str, allowed))}")

    def integer(self, value: Any, path: str, minimum: int | None = None) -> int | None:
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"expected an integer, got {_type_name(value)} {value!r}")
            return None
        if minimum is not None and value < minimum:
            self.add(path, f"must be >= {minimum}, got {value}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.add(path, f"expected true or false, got {_type_name(value)} {value!r}")
            return None
        return value

    def string(self, value: Any, path: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            if value is not _MISSING:
                self.add(path, f"expected a non-empty string, got {_type_name(value)} {value!r}")
            return None
        return value

    def choice(self, value: Any, path: str, choices: Any, what: str = "value") -> str | None:
        if value is _MISSING:
            return None
        if not isinstance(value, str) or value not in choices:
            self.add(path, f"unknown {what} {value!r}{suggest(value, choices)}; choose one of {', '.join(choices)}")
            return None
        return value

    def int_items(self, value: Any, path: str, minimum: int | None, allow_empty: bool = False,
                  ) -> tuple[list[tuple[int, int]], bool]:
        """(position, value) of every valid int in a list (a scalar is a one-item list), and whether all were.

        Valid items are returned even when others are not, so later checks (ranges, pool sizes)
        still report their own problems in the same pass.
        """
        if value is _MISSING:
            return [], False
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            self.add(path, f"expected a list of integers, got {_type_name(value)} {value!r}")
            return [], False
        if not value and not allow_empty:
            self.add(path, "must not be empty")
            return [], False
        out: list[tuple[int, int]] = []
        seen: set[int] = set()
        ok = True
        for i, item in enumerate(value):
            v = self.integer(item, f"{path}[{i}]", minimum)
            if v is None:
                ok = False
            elif v in seen:
                self.add(f"{path}[{i}]", f"duplicate value {v}")
                ok = False
            else:
                seen.add(v)
                out.append((i, v))
        return out, ok


class _BlockLookup:
    """Block references (paper numbers, digit strings, module names) against the model's table."""

    def __init__(self, table: tuple[Any, ...] | None):
        self.table = table

    def resolve(self, ref: Any, path: str, chk: _Checker) -> int | None:
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            chk.add(path, f"expected a block number or module name, got {_type_name(ref)} {ref!r}")
            return None
        if self.table is None:  # the model itself is broken; its problem is already reported
            return int(ref) if isinstance(ref, int) or ref.isdigit() else None
        n = len(self.table)
        if isinstance(ref, str) and not ref.isdigit():
            for info in self.table:
                if info.module == ref:
                    return info.number
            names = [b.module for b in self.table]
            chk.add(path, f"this model has no block named {ref!r}{suggest(ref, names)}; blocks are 1..{n} "
                          f"or module names such as 'input_blocks.0', 'middle_block', '{names[-1]}'")
            return None
        number = int(ref)
        if not 1 <= number <= n:
            chk.add(path, f"block {number} does not exist: this model has blocks 1..{n} (paper numbering, 1-based)")
            return None
        return number

    def info(self, number: int) -> Any:
        return self.table[number - 1] if self.table is not None else None


def _parse_spec(raw: Any, *, default_name: str, base_dir: str, check_files: bool, source: str | None) -> Spec:
    chk = _Checker()
    if not isinstance(raw, Mapping):
        raise SpecError([f"a spec is a mapping of sections ({', '.join(_TOP_KEYS)}), got {_type_name(raw)}"],
                        source)
    chk.unknown_keys(raw, "", _TOP_KEYS)
    for key in _REQUIRED_SECTIONS:
        if key not in raw:
            chk.add(key, "section is required")
    if "version" in raw and raw["version"] != SPEC_VERSION:
        chk.add("version", f"unsupported spec version {raw['version']!r}; this diffbank reads version {SPEC_VERSION}")
    name = raw.get("name", default_name)
    name = chk.string(name, "name") or default_name

    sec = {key: chk.section(raw.get(key, _MISSING), key, schema) for key, schema in _SCHEMA.items()}
    model, table = _check_model(sec["model"], chk, base_dir, check_files)
    image_size = None
    if model is not None:
        image_size = model.image_size
    dataset = _check_dataset(sec["dataset"], chk, base_dir, check_files, image_size, table)
    if table is not None and dataset is not None and model is not None:
        table = _scale_table(table, model.image_size, dataset.image_size)
    grid = _check_features(sec["features"], chk, table, model)
    noise = _check_noise(sec["noise"], chk)
    views = _check_views(sec["views"], chk)
    storage = _check_storage(sec["storage"], chk)
    compute = _check_compute(sec["compute"], chk)

    parts = (model, dataset, grid, noise, views, storage, compute)
    if chk.problems or any(p is None for p in parts) or table is None:
        if not chk.problems:  # defensive: a None part always comes with a reported problem
            chk.add("", "the spec could not be resolved")
        raise SpecError(chk.problems, source)
    return Spec(name, model, dataset, grid, noise, views, storage, compute, block_table=table)  # type: ignore[arg-type]


def _check_model(s: dict[str, Any], chk: _Checker, base_dir: str,
                 check_files: bool) -> tuple[ModelSpec | None, tuple[Any, ...] | None]:
    from extract.models.adm import DEFAULT_FLAGS, DIFFUSION_ONLY_FLAGS, config_from_flags
    from extract.models.registry import embedded_checkpoint, resolve_flags

    ok = True
    preset = chk.string(s["preset"], "model.preset", optional=True)
    if s["preset"] is not None and preset is None:
        ok = False
    flags = s["flags"] if s["flags"] is not None else {}
    if not isinstance(flags, Mapping):
        chk.add("model.flags", f"expected a mapping of guided-diffusion flags, got {_type_name(flags)} {flags!r}")
        flags, ok = {}, False
    known_flags = sorted(set(DEFAULT_FLAGS) | DIFFUSION_ONLY_FLAGS)
    bad_keys = [k for k in flags if k not in known_flags]
    chk.unknown_keys({k: None for k in bad_keys}, "model.flags", known_flags)
    ok = ok and not bad_keys

    resolved: dict[str, Any] | None = None
    if preset is not None:
        try:
            resolve_flags(preset, None)
        except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
            msg = exc.args[0] if exc.args else str(exc)
            chk.add("model.preset", str(msg) + suggest(preset, _preset_names()) if isinstance(exc, KeyError)
                    else str(msg))
            ok = False
    if ok:
        try:
            resolved = resolve_flags(preset, dict(flags))
        except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
            chk.add("model.flags", str(exc.args[0] if exc.args else exc))

    schedule = s["noise_schedule"]
    if schedule is None:
        schedule = (resolved or {}).get("noise_schedule", "linear")
    schedule = chk.choice(schedule, "model.noise_schedule", SCHEDULES, "noise schedule")
    steps = s["diffusion_steps"]
    if steps is None:
        steps = (resolved or {}).get("diffusion_steps", 1000)
    steps = chk.integer(steps, "model.diffusion_steps", 1)
    init_seed = chk.integer(s["init_seed"], "model.init_seed", 0)

    checkpoint = s["checkpoint"]
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        chk.add("model.checkpoint", f"expected a path, 'embedded:<name>' or null, got {_type_name(checkpoint)}")
        checkpoint, ok = None, False
    elif checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if check_files:
            if checkpoint.startswith(EMBEDDED_PREFIX):
                try:
                    embedded_checkpoint(checkpoint.removeprefix(EMBEDDED_PREFIX))
                except FileNotFoundError as exc:
                    chk.add("model.checkpoint", str(exc.args[0] if exc.args else exc))
            else:
                p = Path(checkpoint).expanduser()
                p = p if p.is_absolute() else Path(base_dir) / p
                if not p.is_file():
                    what = "is a directory, not a file" if p.is_dir() else "does not exist"
                    chk.add("model.checkpoint", f"{checkpoint!r} {what} (looked at {p}); download the checkpoint "
                                                f"or pass --no-files to check the rest of the spec")
                elif not os.access(p, os.R_OK):
                    chk.add("model.checkpoint", f"{p} is not readable")

    if resolved is None or schedule is None or steps is None or init_seed is None or not ok:
        return None, None
    full_flags = config_from_flags(**resolved).to_flags()
    try:
        table = block_table_for_flags(full_flags)
    except Exception as exc:  # a flag combination the network itself rejects (e.g. heads vs channels)
        chk.add("model.flags", f"cannot build this network: {exc}")
        return None, None
    return ModelSpec(preset, full_flags, checkpoint, init_seed, schedule, steps), table


def _preset_names() -> list[str]:
    from extract.models.adm import PRESETS
    from extract.models.registry import embedded_models

    return sorted(PRESETS) + [EMBEDDED_PREFIX + n for n in embedded_models()]


def _scale_table(table: tuple[Any, ...], model_size: int, image_size: int) -> tuple[Any, ...]:
    """Block resolutions when the network runs at `image_size` instead of its native size."""
    if image_size == model_size:
        return table
    return tuple(dataclasses.replace(b, resolution=b.resolution * image_size // model_size) for b in table)


def _check_dataset(s: dict[str, Any], chk: _Checker, base_dir: str, check_files: bool,
                   model_size: int | None, table: tuple[Any, ...] | None) -> DatasetSpec | None:
    kind = chk.choice(s["kind"], "dataset.kind", DATASET_KINDS, "dataset kind")
    ok = kind is not None
    path = s["path"]
    if path is not None and not isinstance(path, (str, os.PathLike)):
        chk.add("dataset.path", f"expected a path, got {_type_name(path)} {path!r}")
        path, ok = None, False
    path = os.fspath(path) if path is not None else None
    if kind in ("folder", "csv", "hdf5") and path is None and ok:
        chk.add("dataset.path", f"is required for a {kind} dataset")
        ok = False
    if kind == "digits" and path is not None:
        chk.add("dataset.path", "must be null for the digits dataset (it ships with scikit-learn)")
        ok = False
    if kind == "idx" and path is None:
        path = DEFAULT_FASHION_MNIST_DIR

    splits: tuple[str, ...] | None = None
    if s["splits"] is not None:
        raw = s["splits"]
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not raw:
            chk.add("dataset.splits", f"expected a non-empty list of split names, got {_type_name(raw)} {raw!r}")
            ok = False
        else:
            names: list[str] = []
            for i, item in enumerate(raw):
                v = chk.string(item, f"dataset.splits[{i}]")
                if v is None:
                    ok = False
                elif v in names:
                    chk.add(f"dataset.splits[{i}]", f"duplicate split {v!r}")
                    ok = False
                else:
                    names.append(v)
            fixed = _KNOWN_SPLIT_SIZES.get(kind or "")
            for i, v in enumerate(names):
                if fixed is not None and v not in fixed:
                    chk.add(f"dataset.splits[{i}]", f"the {kind} dataset has splits {', '.join(fixed)}, "
                                                    f"not {v!r}{suggest(v, fixed)}")
                    ok = False
            splits = tuple(names)

    limit: int | dict[str, int] | None = None
    raw_limit = s["limit"]
    if isinstance(raw_limit, Mapping):
        limit = {}
        for key, value in raw_limit.items():
            v = chk.integer(value, f"dataset.limit.{key}", 1)
            if not isinstance(key, str):
                chk.add(f"dataset.limit.{key}", "split names are strings")
                ok = False
            elif splits is not None and key not in splits:
                chk.add(f"dataset.limit.{key}", f"{key!r} is not among dataset.splits{suggest(key, splits)}")
                ok = False
            if v is None:
                ok = False
            else:
                limit[str(key)] = v
    elif raw_limit is not None:
        limit = chk.integer(raw_limit, "dataset.limit", 1)
        ok = ok and limit is not None

    image_size = s["image_size"] if s["image_size"] is not None else model_size
    if image_size is not None:
        image_size = chk.integer(image_size, "dataset.image_size", 1)
        if image_size is not None and table is not None and model_size is not None:
            factor = model_size // min(b.resolution for b in table)  # the U-Net's total downsampling
            if image_size % factor:
                chk.add("dataset.image_size", f"{image_size} is not divisible by {factor}, the U-Net's total "
                                              f"downsampling; the skips would not line up")
                image_size = None
    preprocess = chk.choice(s["preprocess"], "dataset.preprocess", PREPROCESSING, "preprocessing")

    if kind is not None and path is not None and check_files and ok:
        from extract.sources import check_dataset

        for problem in check_dataset(kind, _resolve(path, base_dir), splits):
            chk.add("dataset.path", problem)
    if not ok or image_size is None or preprocess is None or kind is None:
        return None
    return DatasetSpec(kind, path, splits, limit, image_size, preprocess, base_dir=base_dir)


def _resolve(path: str, base_dir: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def _per_block(raw: Any, path: str, chk: _Checker, lookup: _BlockLookup, blocks: list[int] | None,
               read_value: Any, default: Any) -> tuple[dict[int, Any], bool]:
    """Expand `value | {default: value, <block>: value}` into one value per block of `blocks`.

    Returns the values it could read (blocks with a bad value are left out) and whether all were good.
    """
    if not isinstance(raw, Mapping):
        value = read_value(raw, path)
        if value is _MISSING or blocks is None:
            return {}, value is not _MISSING
        return {b: value for b in blocks}, True
    ok = True
    fallback = default
    explicit: dict[int, Any] = {}
    broken: set[int] = set()
    for key, item in raw.items():
        where = f"{path}.{key}"
        if key == "default":
            value = read_value(item, where)
            if value is _MISSING:
                ok, fallback = False, _MISSING
            else:
                fallback = value
            continue
        number = lookup.resolve(key, where, chk)
        value = read_value(item, where)
        if number is None:
            ok = False
            continue
        if blocks is not None and number not in blocks:
            chk.add(where, f"block {number} is not among features.blocks ({', '.join(map(str, blocks))})")
            ok = False
        elif number in explicit or number in broken:
            chk.add(where, f"block {number} is given twice")
            ok = False
        elif value is _MISSING:
            broken.add(number)
            ok = False
        else:
            explicit[number] = value
    out: dict[int, Any] = {}
    for b in blocks or ():
        value = explicit.get(b, _MISSING if b in broken else fallback)
        if value is not _MISSING:
            out[b] = value
    return out, ok


def _check_features(s: dict[str, Any], chk: _Checker, table: tuple[Any, ...] | None,
                    model: ModelSpec | None) -> FeatureGrid | None:
    items, ts_ok = chk.int_items(s["timesteps"], "features.timesteps", minimum=None)
    if model is not None:
        for i, t in items:
            if not 0 <= t < model.diffusion_steps:
                chk.add(f"features.timesteps[{i}]", f"{t} is outside [0, {model.diffusion_steps}) of the "
                                                    f"{model.diffusion_steps}-step {model.noise_schedule} schedule "
                                                    f"(t is the 0-based step index)")
                ts_ok = False
    timesteps = [t for _, t in items] if ts_ok else None

    lookup = _BlockLookup(table)
    # `blocks` keeps the valid entries even when others are bad, so pooling is still checked
    # against them; `blocks_ok` says whether the grid can be built.
    blocks: list[int] = []
    blocks_ok = table is not None
    raw_blocks = s["blocks"]
    if raw_blocks is _MISSING:
        blocks_ok = False
    else:
        if isinstance(raw_blocks, (int, str)) and not isinstance(raw_blocks, bool):
            raw_blocks = [raw_blocks]
        if not isinstance(raw_blocks, list) or not raw_blocks:
            chk.add("features.blocks", f"expected a non-empty list of block numbers or module names, "
                                       f"got {_type_name(raw_blocks)} {raw_blocks!r}")
            blocks_ok = False
        else:
            seen: dict[int, Any] = {}
            for i, ref in enumerate(raw_blocks):
                number = lookup.resolve(ref, f"features.blocks[{i}]", chk)
                if number is None:
                    blocks_ok = False
                elif number in seen:
                    chk.add(f"features.blocks[{i}]", f"duplicate block {number} (already given as {seen[number]!r})")
                    blocks_ok = False
                else:
                    seen[number] = ref
                    blocks.append(number)
    known_blocks = blocks if table is not None else None

    def read_pools(value: Any, where: str) -> Any:
        got, ok = chk.int_items(value, where, minimum=1, allow_empty=True)
        return tuple(sorted(v for _, v in got)) if ok else _MISSING

    def read_tokens(value: Any, where: str) -> Any:
        if value is None or value == 0 and not isinstance(value, bool):
            return None
        got = chk.integer(value, where, 1)
        return _MISSING if got is None else got

    raw_pooling = s["pooling"] if s["pooling"] is not None else {"default": list(DEFAULT_POOLING)}
    pooling, pool_ok = _per_block(raw_pooling, "features.pooling", chk, lookup, known_blocks, read_pools,
                                  DEFAULT_POOLING)
    tokens, tok_ok = _per_block(s["tokens"], "features.tokens", chk, lookup, known_blocks, read_tokens, None)

    for number in known_blocks or ():
        info = lookup.info(number)
        for p in pooling.get(number, ()):
            if p > info.resolution:
                chk.add(_pool_path(raw_pooling, number, info),
                        f"average pool {p} is larger than block {number}'s {info.resolution}x{info.resolution} "
                        f"map ({info.module})")
                pool_ok = False
        if pool_ok and tok_ok and not pooling[number] and tokens[number] is None:
            chk.add("features.pooling",
                    f"block {number} has neither average pooling nor tokens: it would store nothing")
            pool_ok = False
    if timesteps is None or not (blocks_ok and pool_ok and tok_ok):
        return None
    return FeatureGrid(tuple(sorted(timesteps)), tuple(sorted(blocks)),
                       {b: pooling[b] for b in sorted(blocks)},
                       {b: tokens[b] for b in sorted(blocks) if tokens[b] is not None})


def _pool_path(raw_pooling: Any, number: int, info: Any) -> str:
    """The field a block's pool sizes came from, for messages."""
    if isinstance(raw_pooling, Mapping):
        for key in raw_pooling:
            if key == number or key == str(number) or key == info.module:
                return f"features.pooling.{key}"
        return "features.pooling.default"
    return "features.pooling"


def _check_noise(s: dict[str, Any], chk: _Checker) -> NoiseSpec | None:
    seed = chk.integer(s["seed"], "noise.seed", 0)
    draws = chk.integer(s["draws"], "noise.draws", 1)
    return None if seed is None or draws is None else NoiseSpec(seed, draws)


def _check_views(s: dict[str, Any], chk: _Checker) -> ViewSpec | None:
    center = chk.boolean(s["center"], "views.center")
    hflip = chk.boolean(s["hflip"], "views.hflip")
    if center is None or hflip is None:
        return None
    if not (center or hflip):
        chk.add("views", "at least one of center and hflip must be true")
        return None
    return ViewSpec(center, hflip)


def _check_storage(s: dict[str, Any], chk: _Checker) -> StorageSpec | None:
    dtype = chk.choice(s["dtype"], "storage.dtype", tuple(STORAGE_DTYPES), "storage dtype")
    if s["dtype"] == "bfloat16":
        chk.problems[-1] += " (bfloat16 is not a core zarr dtype; use it as compute.dtype)"
    compressor = chk.choice(s["compressor"], "storage.compressor", COMPRESSORS, "compressor")
    chunk_rows = chk.integer(s["chunk_rows"], "storage.chunk_rows", 1)
    shard_rows = None
    if s["shard_rows"] is not None:
        shard_rows = chk.integer(s["shard_rows"], "storage.shard_rows", 1)
        if shard_rows is None:
            return None
        if chunk_rows is not None and shard_rows % chunk_rows:
            chk.add("storage.shard_rows", f"{shard_rows} is not a multiple of chunk_rows={chunk_rows}")
            return None
    if dtype is None or compressor is None or chunk_rows is None:
        return None
    return StorageSpec(dtype, compressor, chunk_rows, shard_rows)


def _check_compute(s: dict[str, Any], chk: _Checker) -> ComputeSpec | None:
    dtype = chk.choice(s["dtype"], "compute.dtype", COMPUTE_DTYPES, "compute dtype")
    batch_size = chk.integer(s["batch_size"], "compute.batch_size", 1)
    num_workers = chk.integer(s["num_workers"], "compute.num_workers", 0)
    device = s["device"]
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        chk.add("compute.device", f"unknown device {device!r}; use auto, cpu, cuda, cuda:<index> or mps")
        device = None
    if dtype is None or batch_size is None or num_workers is None or device is None:
        return None
    return ComputeSpec(dtype, batch_size, device, num_workers)
