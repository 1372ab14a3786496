"""What every record that leaves diffbank carries: plain JSON values, a canonical form and its hash,
a UTC timestamp, and the versions of the libraries that produced it.

Stores (root attributes, fingerprints), probe reports and training states all go through these, so a
value is made JSON-safe by one rule and a fingerprint means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

CORE_PACKAGES = ("diffbank", "torch", "numpy", "zarr", "numcodecs", "dask", "h5py", "scikit-learn", "safetensors")


def to_jsonable(value: Any) -> Any:
    """A plain-JSON copy: dataclasses, mappings, sequences, sets (sorted), numpy and torch values, paths.

    Non-finite floats become None: JSON has no NaN or infinity, and a diverged loss is recorded as null.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v) for v in value), key=json.dumps)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(value.tolist())
    return str(value)


def canonical_json(value: Any) -> str:
    """One spelling of a value: sorted keys, no spaces, ASCII. Equal values give equal text."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(value: Any) -> str:
    """sha256 of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions(names: Iterable[str] = CORE_PACKAGES) -> dict[str, str | None]:
    """Installed versions (None where absent), plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
