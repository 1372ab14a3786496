"""A state directory: the one checkpoint format for training loops (tensors as safetensors + a JSON record).

Layout: `state-{step:04d}.safetensors` (the tensors) and `state.json` (the caller's record plus the name of
the tensor file). Writes are atomic and ordered: the tensor file is written under a temporary name and renamed,
then `state.json` the same way, and only then are older tensor files removed. So `state.json` always names a
complete tensor file, and a crash at any point leaves the previous state loadable. Nothing is ever unpickled.

Optimizer state dicts mix tensors (momentum buffers) with scalars (step counts); `split_optimizer_state` and
`join_optimizer_state` carry them through this format without pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from extract.provenance import to_jsonable

__all__ = ["RECORD_FILE", "has_state", "save_state", "load_state", "split_optimizer_state", "join_optimizer_state"]

RECORD_FILE = "state.json"
_TENSORS_KEY = "tensors"


def has_state(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / RECORD_FILE).exists()


def save_state(
    directory: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any], *, step: int = 0
) -> Path:
    """Write `tensors` and `record` (JSON-able; NaN/inf become null) as the directory's current state."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if _TENSORS_KEY in record:
        raise ValueError(f"record must not use the key {_TENSORS_KEY!r} (the state directory's own)")
    name = f"state-{int(step):04d}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, directory / name)
    tmp_json = directory / (RECORD_FILE + ".tmp")
    tmp_json.write_text(json.dumps(to_jsonable({**record, _TENSORS_KEY: name}), indent=1, allow_nan=False))
    os.replace(tmp_json, directory / RECORD_FILE)  # the commit point
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / RECORD_FILE


def load_state(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, record) of the directory's current state; FileNotFoundError when it holds none."""
    directory = Path(directory)
    record = json.loads((directory / RECORD_FILE).read_text())
    tensors = load_file(str(directory / record.pop(_TENSORS_KEY)))
    return tensors, record


def split_optimizer_state(
    state: Mapping[str, Any], prefix: str = "optim."
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's `state_dict()` as (tensors keyed `{prefix}{param id}.{name}`, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "state_scalars": scalars}


def join_optimizer_state(
    tensors: Mapping[str, torch.Tensor],
    record: Mapping[str, Any],
    prefix: str = "optim.",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The inverse of `split_optimizer_state`: a dict for `optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value if device is None else value.to(device)
    for pid, scalars in record["state_scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    return {"state": state, "param_groups": record["param_groups"]}
