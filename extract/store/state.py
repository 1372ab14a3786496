"""What is at a store URL, read without writing anything (so it works on read-only media)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from extract.store.layout import (
    FEATURES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PROGRESS,
    StoreError,
    array_at,
    attributes,
    existing_root,
    group_at,
    is_local,
    local_path,
)
from extract.store.lease import CREATING_KEY, OWN_KEYS
from extract.store.root_objects import RootObjects


def check_format(attrs: Mapping[str, Any], url: str) -> None:
    """Refuse a store written in a newer format than this diffbank writes: its rules are unknown here."""
    version = attrs.get("format_version")
    if attrs.get("format") == FORMAT_NAME and isinstance(version, int) and version > FORMAT_VERSION:
        raise StoreError(
            f"{url} is a format {version} store, written by a newer diffbank ({attrs.get('diffbank_version')}); "
            f"this diffbank writes format {FORMAT_VERSION}. Upgrade diffbank to resume or extend it"
        )


def check_not_foreign(url: str, objects: RootObjects) -> None:
    """Refuse a URL that holds something other than a store (or the store's own lease objects)."""
    others = [n for n in objects.names() if n not in OWN_KEYS]
    if others or (is_local(url) and local_path(url).exists() and not local_path(url).is_dir()):
        raise StoreError(f"{url} exists and is not a Zarr store; choose another --store path")


@dataclasses.dataclass(frozen=True)
class StoreState:
    """What is at a store URL, read without writing anything (so it works on read-only media)."""

    url: str
    exists: bool  # a diffbank store whose creation finished
    attrs: dict[str, Any]
    pending_units: int | None  # units with an unmarked feature; None when not a finished creation
    interrupted_creation: bool = False

    @property
    def fingerprint(self) -> str | None:
        return self.attrs.get("fingerprint")

    def is_done(self, fingerprint: str) -> bool:
        """Complete and finalized for this fingerprint: a rerun has nothing to write."""
        return (
            self.exists
            and self.fingerprint == fingerprint
            and self.pending_units == 0
            and bool(self.attrs.get("complete"))
            and bool(self.attrs.get("consolidated"))
        )


def store_state(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> StoreState:
    """Inspect `url` read-only; raises StoreError for a newer-format store or something that is not a store."""
    url = os.fspath(url)
    objects = RootObjects(url, storage_options)
    if objects.exists(CREATING_KEY):
        return StoreState(url, False, {}, None, interrupted_creation=True)
    root = existing_root(url, storage_options)
    if root is None:
        check_not_foreign(url, objects)
        return StoreState(url, False, {}, None)
    attrs = attributes(root)
    check_format(attrs, url)
    if attrs.get("format") != FORMAT_NAME or PROGRESS not in root:
        raise StoreError(f"{url} holds a Zarr hierarchy that is not a diffbank store; choose another --store path")
    done = np.asarray(array_at(root, f"{PROGRESS}/done")[:]).astype(bool)
    return StoreState(url, True, attrs, int((~done.all(axis=1)).sum()) if done.size else 0)


def feature_list_problems(root: zarr.Group) -> list[str]:
    """Disagreements between the features the root records, the marker columns and the arrays on disk.

    A store whose metadata was overwritten from a stale copy lists fewer features than it holds; the
    extra arrays are invisible to readers. `extract.store.verify.verify` reports these.
    """
    recorded = list(attributes(root).get("features") or [])
    columns = list(attributes(array_at(root, f"{PROGRESS}/done")).get("features") or []) if PROGRESS in root else []
    on_disk = sorted(name for name, _ in group_at(root, FEATURES).arrays()) if FEATURES in root else []
    problems = []
    if recorded and sorted(recorded) != on_disk:
        lost = sorted(set(recorded) - set(on_disk))
        extra = sorted(set(on_disk) - set(recorded))
        parts = [
            f"recorded but absent: {lost}" if lost else "",
            f"on disk but not in the root's feature list: {extra}" if extra else "",
        ]
        problems.append(
            "the recorded feature list differs from the arrays on disk: " + "; ".join(p for p in parts if p)
        )
    if recorded and columns != recorded:
        problems.append(f"completion markers cover {columns}, the recorded feature list is {recorded}")
    return problems
