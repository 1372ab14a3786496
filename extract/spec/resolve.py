"""From a schema-valid spec to a resolved `Spec`: what needs the model's block table, or the files.

The model's flags resolve to its block table (`extract.models.config`, no network built); against it
the timesteps, blocks, pooling and tokens are checked and expanded per block. With `check_files` the
checkpoint and the dataset are looked at too. Each check appends `(field path, message)` to one list
and carries on, so a user sees every problem of a spec at once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from extract.idx import FASHION_MNIST_DIR
from extract.models.config import (
    DEFAULT_FLAGS,
    DIFFUSION_ONLY_FLAGS,
    EMBEDDED_PREFIX,
    PRESETS,
    block_table,
    config_from_flags,
    embedded_checkpoint,
    embedded_models,
    resolve_flags,
)
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
)
from extract.spec.schema import (
    DEFAULT_POOLING,
    SCHEDULES,
    ComputeSection,
    DatasetSection,
    FeaturesSection,
    ModelSection,
    NoiseSection,
    StorageSection,
    ViewsSection,
    suggest,
)

Problems = list[tuple[str, str]]
_BAD: Any = object()  # a per-block value that was refused (its problem is already reported)


def resolve(
    sections: Mapping[str, Any], name: str, *, base_dir: str, check_files: bool, problems: Problems
) -> Spec | None:
    """The resolved spec, or None when a problem was found (every problem is appended to `problems`).

    `sections` maps each section name to its validated model, or None where the schema refused it.
    """
    model = table = None
    if sections.get("model") is not None:
        model, table = _model(sections["model"], problems, base_dir, check_files)
    dataset = None
    if sections.get("dataset") is not None:
        dataset = _dataset(
            sections["dataset"], problems, base_dir, check_files, model.image_size if model is not None else None, table
        )
    if table is not None and dataset is not None and model is not None:
        table = _scale_table(table, model.image_size, dataset.image_size)
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
# model
# ---------------------------------------------------------------------------------------------


def _preset_names() -> list[str]:
    return sorted(PRESETS) + [EMBEDDED_PREFIX + n for n in embedded_models()]


def _model(
    s: ModelSection, problems: Problems, base_dir: str, check_files: bool
) -> tuple[ModelSpec | None, tuple[Any, ...] | None]:
    if s.family == "diffusers":
        return _diffusers_model(s, problems, base_dir, check_files)
    for key in ("path", "class_label"):
        if getattr(s, key) is not None:
            problems.append((f"model.{key}", "is for model.family: diffusers; an ADM model takes preset/flags/checkpoint"))
    return _adm_model(s, problems, base_dir, check_files)


DIFFUSERS_SCHEDULER_KEYS = ("_class_name", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type")


def _diffusers_model(
    s: ModelSection, problems: Problems, base_dir: str, check_files: bool
) -> tuple[ModelSpec | None, tuple[Any, ...] | None]:
    """A diffusers directory: its config and scheduler are always read (they make the tap table and the
    schedule); with check_files its weights must be there too."""
    from extract.diffusion import NoiseSchedule
    from extract.models.diffusers_unet import (
        DiffusersModelError,
        build_unet,
        locate,
        read_scheduler_config,
        read_unet_config,
        tap_table,
        weights_file,
    )

    adm_only: list[str] = [k for k in ("preset", "flags", "checkpoint", "init_seed") if k in s.model_fields_set]
    for key in adm_only:
        problems.append((f"model.{key}", "is for model.family: adm; a diffusers model is its directory (model.path)"))
    if s.path is None:
        problems.append(("model.path", "is required for model.family: diffusers (a local save_pretrained directory)"))
        return None, None
    try:
        unet_dir, scheduler_dir = locate(s.path, base_dir)
        config = read_unet_config(unet_dir)
        if check_files:
            weights_file(unet_dir)
        scheduler = read_scheduler_config(scheduler_dir)
    except (DiffusersModelError, OSError, ValueError) as exc:
        problems.append(("model.path", str(exc)))
        return None, None
    if scheduler is not None:
        scheduler = {k: scheduler[k] for k in DIFFUSERS_SCHEDULER_KEYS if k in scheduler}
        for key in ("noise_schedule", "diffusion_steps"):
            if getattr(s, key) is not None:
                problems.append((f"model.{key}", f"the schedule comes from {scheduler_dir}; remove model.{key}"))
    try:
        schedule = NoiseSchedule.for_model(s.noise_schedule or "linear", s.diffusion_steps or 1000, scheduler)
    except ValueError as exc:
        problems.append(("model.path", f"{scheduler_dir}: {exc}"))
        return None, None
    classes = config.get("num_class_embeds")
    conditional = config.get("class_embed_type") is not None or classes is not None
    if conditional and s.class_label is None:
        problems.append(("model.class_label", "this UNet is class-conditional: set the class it is given"))
    elif not conditional and s.class_label is not None:
        problems.append(("model.class_label", "this UNet is unconditional: it takes no class"))
    elif isinstance(s.class_label, int) and classes is not None and s.class_label >= classes:
        problems.append(("model.class_label", f"{s.class_label} is not among the model's {classes} classes"))
    try:
        table = tap_table(build_unet(config))
    except Exception as exc:  # a config that diffusers itself cannot build
        problems.append(("model.path", f"diffusers cannot build this UNet2DModel: {exc}"))
        return None, None
    flags = {k: v for k, v in config.items() if not k.startswith("_")}
    model = ModelSpec(
        None, flags, None, 0, schedule.name, schedule.num_steps, "diffusers", s.path, scheduler, s.class_label
    )
    return model, table


def _adm_model(
    s: ModelSection, problems: Problems, base_dir: str, check_files: bool
) -> tuple[ModelSpec | None, tuple[Any, ...] | None]:
    ok = True
    flags = dict(s.flags or {})
    known_flags = sorted(set(DEFAULT_FLAGS) | DIFFUSION_ONLY_FLAGS)
    for key in flags:
        if key not in known_flags:
            problems.append(
                (f"model.flags.{key}", f"unknown key{suggest(key, known_flags)}; allowed: {', '.join(known_flags)}")
            )
            ok = False
    if s.preset is not None:
        try:
            resolve_flags(s.preset, None)
        except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
            msg = str(exc.args[0] if exc.args else exc)
            problems.append(
                ("model.preset", msg + suggest(s.preset, _preset_names()) if isinstance(exc, KeyError) else msg)
            )
            ok = False
    resolved: dict[str, Any] = {}
    if ok:
        try:
            resolved = resolve_flags(s.preset, flags)
        except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
            problems.append(("model.flags", str(exc.args[0] if exc.args else exc)))
            ok = False
    schedule = s.noise_schedule or resolved.get("noise_schedule", "linear")
    if schedule not in SCHEDULES:
        problems.append(
            ("model.noise_schedule", f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        )
        ok = False
    steps = int(s.diffusion_steps or resolved.get("diffusion_steps", 1000))
    checkpoint_ok = True
    if s.checkpoint is not None and check_files:
        problem = _checkpoint_problem(s.checkpoint, base_dir)
        if problem:
            problems.append(("model.checkpoint", problem))
            checkpoint_ok = False
    if not ok:
        return None, None
    try:
        full_flags = config_from_flags(**resolved).to_flags()
        table = block_table(config_from_flags(**full_flags))
    except (ValueError, TypeError) as exc:  # a flag combination the network itself rejects
        problems.append(("model.flags", f"cannot build this network: {exc}"))
        return None, None
    if s.checkpoint is not None and check_files and checkpoint_ok:
        problem = _checkpoint_header_problem(s.checkpoint, base_dir, full_flags)
        if problem:
            problems.append(("model.checkpoint", problem))
    return ModelSpec(s.preset, full_flags, s.checkpoint, s.init_seed, schedule, steps), table


def _checkpoint_problem(checkpoint: str, base_dir: str) -> str:
    if checkpoint.startswith(EMBEDDED_PREFIX):
        try:
            embedded_checkpoint(checkpoint.removeprefix(EMBEDDED_PREFIX))
        except FileNotFoundError as exc:
            return str(exc.args[0] if exc.args else exc)
        return ""
    p = _resolve(checkpoint, base_dir)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        return (
            f"{checkpoint!r} {what} (looked at {p}); download the checkpoint "
            f"or pass --no-files to check the rest of the spec"
        )
    if not os.access(p, os.R_OK):
        return f"{p} is not readable"
    return ""


def _checkpoint_header_problem(checkpoint: str, base_dir: str, flags: dict[str, Any]) -> str:
    """Whether the checkpoint's tensors (read from its header, nothing loaded) fit the model's keys and shapes."""
    # Lazy: the header check builds the network on the meta device, and torch's import (about 3 s on a
    # 2-core machine, against 1.2 s for all of extract.spec) is paid only when a checkpoint is checked.
    from extract.models.checkpoints import CheckpointError, check_header

    if checkpoint.startswith(EMBEDDED_PREFIX):
        path = Path(embedded_checkpoint(checkpoint.removeprefix(EMBEDDED_PREFIX)))
    else:
        path = _resolve(checkpoint, base_dir)
    try:
        check_header(path, flags)
    except CheckpointError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    return ""


def _scale_table(table: tuple[Any, ...], model_size: int, image_size: int) -> tuple[Any, ...]:
    """Block resolutions when the network runs at `image_size` instead of its native size."""
    if image_size == model_size:
        return table
    return tuple(dataclasses.replace(b, resolution=b.resolution * image_size // model_size) for b in table)


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------


def _resolve(path: str, base_dir: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


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

        for problem in check_dataset(kind, _resolve(path, base_dir), splits):
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
