"""A store as lazy xarray objects: one feature as a DataArray, or every feature array as a DataTree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from extract.store.metadata import StoreMetadata


def feature_dataarray(store: StoreMetadata, name: str, data: Any) -> Any:
    """Feature `name` (`data`: its dask array) as a DataArray with dims (sample, channel, y, x), coordinates label, id, split and
    valid and the feature's attributes. The same in every store format: the stored dimension names (the
    feature's own from format 3, which plain `xarray.open_datatree` needs) are not used here."""
    import xarray as xr

    dims = ("sample", "channel", "y", "x") if data.ndim == 4 else ("sample", "channel")[: data.ndim]
    info = store.feature_info(name)
    attrs = {k: v for k, v in info.to_attrs().items() if v is not None}
    attrs["stats"] = str(info.stats) if info.stats else ""
    attrs["pool"] = attrs.get("pool") or ""
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items()}
    attrs["shape"] = list(info.shape)
    coords = {
        "label": ("sample", store.labels),
        "id": ("sample", store.sample_ids),
        "split": ("sample", split_names(store.split_masks(), store.num_samples)),
        "valid": ("sample", store.valid),
    }
    return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=attrs)


def store_datatree(store: StoreMetadata, dask_of: Callable[[str], Any]) -> Any:
    """A DataTree with one node per feature array (noise draws >= 1 included); `dask_of(name)` gives its data."""
    import xarray as xr

    return xr.DataTree.from_dict(
        {
            f"/{n}": xr.Dataset({n: feature_dataarray(store, n, dask_of(n))}, attrs={"feature": n})
            for n in store.array_names()
        }
        | {"/": xr.Dataset(attrs={"fingerprint": store.fingerprint, "url": store.url})}
    )


def split_names(masks: dict[str, np.ndarray], num_samples: int) -> np.ndarray:
    """Per sample, the splits it belongs to ('+'-joined where splits overlap; '' for none)."""
    names = np.full(num_samples, "", dtype=object)
    for split in sorted(masks):
        mask = masks[split]
        names[mask] = np.where(names[mask] == "", split, names[mask] + "+" + split)
    return names.astype(str)
