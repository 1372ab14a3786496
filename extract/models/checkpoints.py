"""Safe checkpoint loading: `.pt` state dicts through the weights-only unpickler, or safetensors.

Checkpoints come from other teams, so nothing here executes pickled code. Errors name the key,
the expected and found shapes, and the guided-diffusion flag that most likely differs.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("ema", "model_ema", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model as asked."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from `.safetensors` or a weights-only `.pt`, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a plain state dict that can be loaded safely (weights_only=True refused it: "
            f"{first}). diffbank never unpickles arbitrary objects; convert the file to a state dict "
            f"or safetensors on a machine you trust."
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: entries {bad[:5]} are not name -> tensor")
    return obj


def _flag_hint(key: str, expected: tuple[int, ...] | None = None, found: tuple[int, ...] | None = None) -> str:
    """The guided-diffusion flag that most likely explains a difference at `key`."""
    if key.startswith("label_emb"):
        return "class_cond"
    if key.startswith("out.2") and expected and found and expected[0] != found[0]:
        return "learn_sigma"
    if key.startswith("time_embed") or key.startswith("input_blocks.0.0"):
        return "num_channels"
    if ".op." in key or "h_upd" in key or ".conv." in key:
        return "resblock_updown"
    if "emb_layers" in key and expected and found and expected[0] in (2 * found[0], found[0] // 2):
        return "use_scale_shift_norm"
    if re.search(r"\.(qkv|proj_out|norm)\.", key):
        return "attention_resolutions"
    return "channel_mult / num_res_blocks / num_channels"


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        (k, tuple(own[k].shape), tuple(state[k].shape))
        for k in own
        if k in state and tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} does not match the model:"]
    for k, exp, got in shapes[:10]:
        lines.append(
            f"  shape mismatch at {k}: model expects {list(exp)}, checkpoint has {list(got)} "
            f"(check the flag {_flag_hint(k, exp, got)})"
        )
    if missing:
        lines.append(
            f"  {len(missing)} missing key(s), e.g. {', '.join(missing[:5])} (check the flag {_flag_hint(missing[0])})"
        )
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])} "
            f"(check the flag {_flag_hint(unexpected[0])})"
        )
    raise CheckpointError("\n".join(lines))


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Load `path` into `model` strictly; returns the file's sha256 for provenance."""
    state = read_state_dict(path)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return sha256_file(path)


def save_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
