"""Safe checkpoint loading: `.pt` state dicts through the weights-only unpickler, or safetensors.

Checkpoints come from other teams, so nothing here executes pickled code. Errors name the key,
the expected and found shapes, and the guided-diffusion flag that most likely differs.

`read_header` lists a checkpoint's tensor names and shapes without loading any tensor: the JSON
header of a safetensors file, or the index of a torch zip archive (`data.pkl`), read by an unpickler
that resolves no global and calls nothing from the file. `spec check` compares it with the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from extract.models.adm import ADMUNet

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
    if not zipfile.is_zipfile(path) and not _looks_like_legacy_torch(path):
        raise CheckpointError(_NOT_A_CHECKPOINT.format(path=path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a plain state dict that can be loaded safely (weights_only=True refused it: "
            f"{_torch_reason(exc)}). diffbank "
            f"never unpickles arbitrary objects; convert the file to a state dict or safetensors on a "
            f"machine you trust."
        ) from None
    return _unwrap(obj, path)


_NOT_A_CHECKPOINT = (
    "{path}: not a checkpoint diffbank can read: neither a torch zip archive (torch.save) nor a "
    "safetensors file (the file may be truncated, corrupt or of another kind)"
)


def _looks_like_legacy_torch(path: Path) -> bool:
    """torch.save's pre-1.6 format starts with a pickle (protocol 2+)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _torch_reason(exc: BaseException) -> str:
    """torch's refusal without its advice to retry with weights_only=False, the unsafe thing to do here."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, flags=re.S)
    if found:
        # its first sentence: what follows advises allow-listing globals, unsafe for an untrusted file
        return found.group(1).strip().splitlines()[0].split(". ")[0].rstrip(".")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Headers: names and shapes without loading
# ---------------------------------------------------------------------------------------------

_MAX_INDEX_BYTES = 256 << 20


class _Global:
    """A global named by the pickle, never imported."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: object) -> _Call:
        return _Call(self, args)


class _Call:
    """What calling a global would have built: recorded, not run."""

    def __init__(self, fn: _Global, args: tuple[object, ...]):
        self.fn, self.args = fn, args
        self.items: dict[object, object] = {}
        self.state: object = None

    def __setitem__(self, key: object, value: object) -> None:
        self.items[key] = value

    def __setstate__(self, state: object) -> None:
        self.state = state


class _SymbolicUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> _Global:
        return _Global(module, name)

    def persistent_load(self, pid: object) -> object:
        return ("storage", pid)


def _shape_of(value: object) -> tuple[int, ...] | None:
    if isinstance(value, _Call) and value.fn.module.startswith("torch"):
        if value.fn.name == "_rebuild_parameter" and value.args:
            return _shape_of(value.args[0])
        if value.fn.name.startswith("_rebuild_tensor") and len(value.args) >= 3:
            size = value.args[2]
            if isinstance(size, tuple) and all(isinstance(d, int) for d in size):
                return tuple(size)
    return None


def _as_mapping(value: object) -> dict[object, object] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, _Call) and value.fn.name in ("OrderedDict", "dict"):
        return value.items
    return None


def _zip_index(path: Path) -> object:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                raise CheckpointError(f"{path}: a zip archive without data.pkl: not a torch checkpoint")
            info = zf.getinfo(names[0])
            if info.file_size > _MAX_INDEX_BYTES:
                raise CheckpointError(f"{path}: its tensor index is {info.file_size} bytes: not a plain state dict")
            data = zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: a damaged zip archive ({exc})") from None
    try:
        return _SymbolicUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # any malformed pickle: report it, never run it
        raise CheckpointError(f"{path}: its tensor index cannot be read ({type(exc).__name__}: {exc})") from None


def _safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short for a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: not a safetensors file (its header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shapes[key] = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{path}: malformed safetensors entry for {key!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return shapes


def read_header(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint, from its header alone (nothing loaded, nothing unpickled).

    Raises CheckpointError for a file that is not a readable safetensors file or torch zip archive.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _safetensors_header(path)
    if not zipfile.is_zipfile(path):
        if _looks_like_legacy_torch(path):
            raise CheckpointError(
                f"{path}: a legacy (pre-1.6) torch.save file, whose tensor index cannot be read without "
                f"loading it; re-save it with a current torch or as safetensors"
            )
        raise CheckpointError(_NOT_A_CHECKPOINT.format(path=path))
    obj = _zip_index(path)
    for _ in range(3):  # the wrappers training scripts put around a state dict
        mapping = _as_mapping(obj)
        if mapping is None:
            break
        inner = next((mapping[k] for k in _WRAPPER_KEYS if _as_mapping(mapping.get(k)) is not None), None)
        if inner is None:
            break
        obj = inner
    mapping = _as_mapping(obj)
    if not mapping:
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    bad = []
    for key, value in mapping.items():
        shape = _shape_of(value)
        if not isinstance(key, str) or shape is None:
            bad.append(key)
        else:
            shapes[key] = shape
    if bad:
        raise CheckpointError(f"{path}: not a state dict: entries {bad[:5]} are not name -> tensor")
    return shapes


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
    check_shapes(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in state.items()},
        source,
    )


def check_shapes(own: dict[str, tuple[int, ...]], state: dict[str, tuple[int, ...]], source: str) -> None:
    """`check_state_dict` on names and shapes alone (a header, a meta-device model)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(own[k]), tuple(state[k])) for k in own if k in state and tuple(own[k]) != tuple(state[k])]
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


def expected_shapes(flags: dict[str, object]) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the ADM U-Net these guided-diffusion flags build (on the meta device: no memory)."""
    with torch.device("meta"):
        model = ADMUNet.from_flags(**flags)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_header(path: str | os.PathLike, flags: dict[str, object]) -> None:
    """Raise CheckpointError unless the checkpoint's header matches the model of `flags`, key for key."""
    check_shapes(expected_shapes(flags), read_header(path), str(path))


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
