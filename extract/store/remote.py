"""Remote stores: fsspec storage options from `key=value` strings (the CLI's --storage-option).

Endpoint and credentials normally come from fsspec/s3fs's own configuration: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws. Options given here override it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from extract.store.layout import StoreError


def parse_storage_options(items: Iterable[str]) -> dict[str, Any] | None:
    """{"endpoint_url": ..., "client_kwargs": {"region_name": ...}} from ["endpoint_url=...",
    "client_kwargs.region_name=..."]: dots nest, values that parse as JSON (true, 3, {...}) are typed,
    anything else stays a string. None when there are none, so fsspec's defaults apply untouched."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StoreError(f"storage option {item!r}: write key=value (e.g. endpoint_url=http://127.0.0.1:9000)")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StoreError(f"storage option {item!r}: {part} is already a value, not a group")
        node[leaf] = value
    return out or None
