"""From a schema-valid spec to a resolved `Spec`: what needs the model's block table, or the files.

The model section resolves to its block table (`extract.spec.model_section`); against it the
timesteps, blocks, pooling and tokens are checked and expanded per block. With `check_files` the
checkpoint and the dataset are looked at too. Each check appends `(field path, message)` to one list
and carries on, so a user sees every problem of a spec at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extract.idx import FASHION_MNIST_DIR
from extract.spec.fields import Problems, suggest
from extract.spec.model_section import resolve_model, scale_table
from extract.spec.resolved import (
    KNOWN_SPLIT_SIZES,
    ComputeSpec,
    DatasetSpec,
    FeatureGrid,
    ModelSpec,
    NoiseSpec,
    Spec,
    StorageSpec,
    ViewSpec,
    resolve_path,
)
from extract.spec.schema import (
    DEFAULT_POOLING,
    ComputeSection,
    DatasetSection,
    FeaturesSection,
    NoiseSection,
    StorageSection,
    ViewsSection,
)

_BAD: Any = object()  # a per-block value that was refused (its problem is already reported)


def resolve(
    sections: Mapping[str, Any], name: str, *, base_dir: str, check_files: bool, problems: Problems
) -> Spec | None:
    """The resolved spec, or None when a problem was found (every problem is appended to `problems`).

    `sections` maps each section name to its validated model, or None where the schema refused it.
    """
    model = table = None
    if sections.get("model") is not None:
        model, table = resolve_model(sections["model"], problems, base_dir, check_files)
    dataset = None
    if sections.get("dataset") is not None:
        dataset = _dataset(
            sections["dataset"], problems, base_dir, check_files, model.image_size if model is not None else None, table
        )
    if table is not None and dataset is not None and model is not None:
        table = scale_table(table, model.image_size, dataset.image_size)
    grid = None
    if sections.get("features") is not None:
        grid = _features(sections["features"], problems, table, model)
    plain = [_plain(sections.get(k)) for k in ("noise", "views", "storage", "compute")]
    if problems or model is None or dataset is None or grid is None or any(p is None for p in plain) or table is None:
        return None
    noise, views, storage, compute = plain
    return Spec(name, model, dataset, grid, noise, views, storage, compute, block_table=table)


def _plain(section: Any) -> Any:
    kinds: dict[type, type] = {
        NoiseSection: NoiseSpec,
        ViewsSection: ViewSpec,
        StorageSection: StorageSpec,
        ComputeSection: ComputeSpec,
    }
    return None if section is None else kinds[type(section)](**section.model_dump())


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------


def _dataset(
    s: DatasetSection,
    problems: Problems,
    base_dir: str,
    check_files: bool,
    model_size: int | None,
    table: tuple[Any, ...] | None,
) -> DatasetSpec | None:
    ok = True
    kind, path = s.kind, s.path
    if kind in ("folder", "csv", "hdf5") and path is None:
        problems.append(("dataset.path", f"is required for a {kind} dataset"))
        ok = False
    if kind == "digits" and path is not None:
        problems.append(("dataset.path", "must be null for the digits dataset (it ships with scikit-learn)"))
        ok = False
    if kind == "idx" and path is None:
        path = str(FASHION_MNIST_DIR)

    splits: tuple[str, ...] | None = None
    if s.splits is not None:
        fixed = KNOWN_SPLIT_SIZES.get(kind)
        for i, v in enumerate(s.splits):
            if v in s.splits[:i]:
                problems.append((f"dataset.splits[{i}]", f"duplicate split {v!r}"))
                ok = False
            elif fixed is not None and v not in fixed:
                problems.append(
                    (
                        f"dataset.splits[{i}]",
                        f"the {kind} dataset has splits {', '.join(fixed)}, not {v!r}{suggest(v, fixed)}",
                    )
                )
                ok = False
        splits = tuple(s.splits)
    if isinstance(s.limit, Mapping) and splits is not None:
        for key in s.limit:
            if key not in splits:
                problems.append((f"dataset.limit.{key}", f"{key!r} is not among dataset.splits{suggest(key, splits)}"))
                ok = False

    image_size = s.image_size if s.image_size is not None else model_size
    if image_size is not None and table is not None and model_size is not None:
        factor = model_size // min(b.resolution for b in table)  # the U-Net's total downsampling
        if image_size % factor:
            problems.append(
                (
                    "dataset.image_size",
                    f"{image_size} is not divisible by {factor}, the U-Net's total "
                    f"downsampling; the skips would not line up",
                )
            )
            image_size = None
    if path is not None and check_files and ok:
        from extract.sources import check_dataset

        for problem in check_dataset(kind, resolve_path(path, base_dir), splits):
            problems.append(("dataset.path", problem))
    if not ok or image_size is None:
        return None
    return DatasetSpec(kind, path, splits, s.limit, image_size, s.preprocess, base_dir=base_dir)


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


class _Blocks:
    """Block references (paper numbers, digit strings, module names) against the model's table."""

    def __init__(self, table: tuple[Any, ...] | None):
        self.table = table

    def number(self, ref: int | str, path: str, problems: Problems) -> int | None:
        if self.table is None:  # the model itself is broken; its problem is already reported
            return int(ref) if isinstance(ref, int) or ref.isdigit() else None
        n = len(self.table)
        if isinstance(ref, str) and not ref.isdigit():
            for info in self.table:
                if info.module == ref:
                    return info.number
            names = [b.module for b in self.table]
            problems.append(
                (
                    path,
                    f"this model has no block named {ref!r}{suggest(ref, names)}; blocks are 1..{n} "
                    f"or module names such as '{names[0]}', '{names[n // 2]}', '{names[-1]}'",
                )
            )
            return None
        number = int(ref)
        if not 1 <= number <= n:
            problems.append(
                (path, f"block {number} does not exist: this model has blocks 1..{n} (paper numbering, 1-based)")
            )
            return None
        return number

    def info(self, number: int) -> Any:
        if self.table is None:
            raise ValueError("a block's info needs the model's block table")
        return self.table[number - 1]


def _per_block(
    raw: Any, path: str, problems: Problems, lookup: _Blocks, blocks: list[int] | None, default: Any
) -> tuple[dict[int, Any], bool]:
    """Expand `value | {default: value, <block>: value}` into one value per block of `blocks`.

    Returns the values per block and whether every key named a block of `blocks` once.
    """
    if not isinstance(raw, Mapping):
        value = default if raw is None else raw
        return {b: value for b in blocks or ()}, True
    ok = True
    fallback = raw.get("default", default)
    explicit: dict[int, Any] = {}
    for key, value in raw.items():
        if key == "default":
            continue
        where = f"{path}.{key}"
        number = lookup.number(key, where, problems)
        if number is None:
            ok = False
        elif blocks is not None and number not in blocks:
            problems.append((where, f"block {number} is not among features.blocks ({', '.join(map(str, blocks))})"))
            ok = False
        elif number in explicit:
            problems.append((where, f"block {number} is given twice"))
            ok = False
        else:
            explicit[number] = value
    return {b: explicit.get(b, fallback) for b in blocks or ()}, ok


def _pool_path(raw_pooling: Any, number: int, info: Any) -> str:
    """The field a block's pool sizes came from, for messages."""
    if isinstance(raw_pooling, Mapping):
        for key in raw_pooling:
            if key == number or key == str(number) or key == info.module:
                return f"features.pooling.{key}"
        return "features.pooling.default"
    return "features.pooling"


def _distinct(values: list[Any], path: str, problems: Problems, what: str) -> bool:
    ok = True
    seen: set[Any] = set()
    for i, v in enumerate(values):
        if v in seen:
            problems.append((f"{path}[{i}]", f"duplicate {what} {v}"))
            ok = False
        seen.add(v)
    return ok


def _features(
    s: FeaturesSection, problems: Problems, table: tuple[Any, ...] | None, model: ModelSpec | None
) -> FeatureGrid | None:
    ts_ok = _distinct(s.timesteps, "features.timesteps", problems, "value")
    if model is not None and len(s.timesteps) > model.diffusion_steps:
        problems.append(
            (
                "features.timesteps",
                f"has {len(s.timesteps)} entries, more than the {model.diffusion_steps} steps of the schedule",
            )
        )
        ts_ok = False
    elif model is not None:
        for i, t in enumerate(s.timesteps):
            if not 0 <= t < model.diffusion_steps:
                problems.append(
                    (
                        f"features.timesteps[{i}]",
                        f"{t} is outside [0, {model.diffusion_steps}) of the {model.diffusion_steps}-step "
                        f"{model.noise_schedule} schedule (t is the 0-based step index)",
                    )
                )
                ts_ok = False

    lookup = _Blocks(table)
    # `blocks` keeps the valid entries even when others are bad, so pooling is still checked against them.
    blocks: list[int] = []
    blocks_ok = table is not None
    seen: dict[int, Any] = {}
    for i, ref in enumerate(s.blocks):
        number = lookup.number(ref, f"features.blocks[{i}]", problems)
        if number is None:
            blocks_ok = False
        elif number in seen:
            problems.append((f"features.blocks[{i}]", f"duplicate block {number} (already given as {seen[number]!r})"))
            blocks_ok = False
        else:
            seen[number] = ref
            blocks.append(number)
    known_blocks = blocks if table is not None else None

    pooling, pool_ok = _per_block(s.pooling, "features.pooling", problems, lookup, known_blocks, list(DEFAULT_POOLING))
    written = s.pooling.items() if isinstance(s.pooling, Mapping) else [(None, s.pooling or [])]
    for key, sizes in written:
        where = "features.pooling" if key is None else f"features.pooling.{key}"
        pool_ok = _distinct(sizes, where, problems, "value") and pool_ok
    tokens, tok_ok = _per_block(s.tokens, "features.tokens", problems, lookup, known_blocks, None)

    for number in known_blocks or ():
        info = lookup.info(number)
        for p in pooling[number]:
            if p > info.resolution:
                problems.append(
                    (
                        _pool_path(s.pooling, number, info),
                        f"average pool {p} is larger than block {number}'s {info.resolution}x"
                        f"{info.resolution} map ({info.module})",
                    )
                )
                pool_ok = False
        if pool_ok and tok_ok and not pooling[number] and tokens[number] is None:
            problems.append(
                ("features.pooling", f"block {number} has neither average pooling nor tokens: it would store nothing")
            )
            pool_ok = False
    if not (ts_ok and blocks_ok and pool_ok and tok_ok):
        return None
    return FeatureGrid(
        tuple(sorted(s.timesteps)),
        tuple(sorted(blocks)),
        {b: tuple(sorted(pooling[b])) for b in sorted(blocks)},
        {b: tokens[b] for b in sorted(blocks) if tokens[b] is not None},
    )
