"""The model section resolved: an ADM U-Net's flags or a diffusers directory, to a `ModelSpec` and its block table.

ADM: the preset and flags resolve to a block table (`extract.models.config`, no network built), and with
`check_files` the checkpoint's header is checked against the network's shapes. diffusers: the directory's
UNet and scheduler configs make the tap table and the noise schedule. Each problem is appended to
`problems` as `(field path, message)`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

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
from extract.spec.fields import Problems, suggest
from extract.spec.resolved import ModelSpec, resolve_path
from extract.spec.schema import SCHEDULES, ModelSection


def _preset_names() -> list[str]:
    return sorted(PRESETS) + [EMBEDDED_PREFIX + n for n in embedded_models()]


def resolve_model(
    s: ModelSection, problems: Problems, base_dir: str, check_files: bool
) -> tuple[ModelSpec | None, tuple[Any, ...] | None]:
    if s.family == "diffusers":
        return _diffusers_model(s, problems, base_dir, check_files)
    for key in ("path", "class_label"):
        if getattr(s, key) is not None:
            problems.append(
                (f"model.{key}", "is for model.family: diffusers; an ADM model takes preset/flags/checkpoint")
            )
    return _adm_model(s, problems, base_dir, check_files)


DIFFUSERS_SCHEDULER_KEYS = (
    "_class_name",
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "trained_betas",
    "prediction_type",
)


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
    p = resolve_path(checkpoint, base_dir)
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
        path = resolve_path(checkpoint, base_dir)
    try:
        check_header(path, flags)
    except CheckpointError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    return ""


def scale_table(table: tuple[Any, ...], model_size: int, image_size: int) -> tuple[Any, ...]:
    """Block resolutions when the network runs at `image_size` instead of its native size."""
    if image_size == model_size:
        return table
    return tuple(dataclasses.replace(b, resolution=b.resolution * image_size // model_size) for b in table)
