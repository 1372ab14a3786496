"""Creating a store's arrays as `layout` planned them: features (sharded, chunked along samples), samples,
splits and progress markers. Every array is written with `WRITE_EVERY_CHUNK` and the sample arrays are
filled at creation, so from format 4 every chunk is stored and an absent one is damage. A unit's marker
chunks are written when it is marked: absent ones mean "not done" until the store is finalized complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from extract.storage import COMPRESSIONS
from extract.store.layout import (
    FEATURE_DIMS,
    FORMAT_VERSION,
    MACHINE_RECORD,
    OWN_DIMS_SINCE,
    STATS_FIELDS,
    WRITE_EVERY_CHUNK,
    FeatureInfo,
    Layout,
    StoreError,
)

_SAMPLE_CHUNK = 1 << 16


def compressors(compression: str) -> list[Any]:
    """Bytes-to-bytes codecs of a feature array's inner chunks: the compressor, then the checksum."""
    if compression == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "none":
        return [Crc32cCodec()]
    raise StoreError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


# Sample, split and progress arrays: zarr's default compression plus the checksum.
_SMALL_CODECS = (ZstdCodec(level=0), Crc32cCodec())


def feature_dims(name: str, ndim: int, format_version: int = FORMAT_VERSION) -> tuple[str, ...] | None:
    """Dimension names of feature `name` with `ndim` axes (sample first): None for shapes without names.

    From format 3 every axis but `sample` carries the feature's name (`t090_b24_avg2_channel`): features
    differ in channel and spatial sizes, and xarray requires one size per dimension name across a group,
    while `sample` is shared with the arrays under samples/ and splits/ so they align as coordinates.
    """
    axes = {4: FEATURE_DIMS, 2: FEATURE_DIMS[:2]}.get(ndim)
    if axes is None or format_version < OWN_DIMS_SINCE:
        return axes
    return (axes[0], *(f"{name}_{axis}" for axis in axes[1:]))


def create_feature_array(
    group: zarr.Group, info: FeatureInfo, layout: Layout, compression: str, format_version: int = FORMAT_VERSION
) -> None:
    """`format_version`: the store's, so a feature added to an older store is named as its others are."""
    shape = (layout.num_samples, *info.shape)
    dims = feature_dims(info.name, len(shape), format_version)
    group.create_array(
        info.name,
        shape=shape,
        dtype=info.dtype,
        chunks=(layout.chunk_rows[info.name], *info.shape),
        shards=(layout.shard_rows, *info.shape),
        compressors=compressors(compression),
        fill_value=0.0,
        dimension_names=dims,
        attributes=info.to_attrs(),
        config=WRITE_EVERY_CHUNK,
    )


def create_progress(group: zarr.Group, names: Sequence[str], num_units: int) -> None:
    width = max(1, len(names))
    group.create_array(
        "done",
        shape=(num_units, len(names)),
        dtype="uint8",
        chunks=(1, width),
        compressors=_SMALL_CODECS,
        fill_value=0,
        dimension_names=("unit", "feature"),
        attributes={
            "features": list(names),
            "meaning": "1 = this (unit, feature) was fully written; markers come after the data",
        },
        config=WRITE_EVERY_CHUNK,
    )
    group.create_array(
        "stats",
        shape=(num_units, len(names), len(STATS_FIELDS)),
        dtype="float64",
        chunks=(1, width, len(STATS_FIELDS)),
        compressors=_SMALL_CODECS,
        fill_value=0.0,
        dimension_names=("unit", "feature", "stat"),
        attributes={"fields": list(STATS_FIELDS)},
        config=WRITE_EVERY_CHUNK,
    )
    create_machine_record(group, num_units)


def create_machine_record(group: zarr.Group, num_units: int) -> None:
    """Per unit, the machine signatures that wrote its features (stores written across machine kinds)."""
    group.create_array(
        MACHINE_RECORD,
        shape=(num_units,),
        dtype=str,
        chunks=(1,),  # one chunk per unit: only the unit's owner writes it, as with its markers
        compressors=_SMALL_CODECS,
        fill_value="",
        dimension_names=("unit",),
        attributes={"meaning": "JSON list of the machine signatures that wrote this unit (extract.hardware)"},
        config=WRITE_EVERY_CHUNK,
    )


def create_samples(group: zarr.Group, ids: np.ndarray, labels: np.ndarray, shard_rows: int) -> None:
    n = int(len(ids))
    group.create_array(
        "label",
        data=labels,
        chunks=(min(n, _SAMPLE_CHUNK),),
        compressors=_SMALL_CODECS,
        dimension_names=("sample",),
        attributes={"unknown": -1},
        config=WRITE_EVERY_CHUNK,
    )
    ids_arr = group.create_array(
        "id",
        shape=(n,),
        dtype=str,
        chunks=(min(n, _SAMPLE_CHUNK),),
        compressors=_SMALL_CODECS,
        dimension_names=("sample",),
        config=WRITE_EVERY_CHUNK,
    )
    ids_arr[:] = ids
    valid = group.create_array(
        "valid",
        shape=(n,),
        dtype=bool,
        chunks=(shard_rows,),
        compressors=_SMALL_CODECS,
        fill_value=False,
        dimension_names=("sample",),
        attributes={"meaning": "False: the image failed (rows zero) or its unit is not written yet"},
        config=WRITE_EVERY_CHUNK,
    )
    error = group.create_array(
        "error",
        shape=(n,),
        dtype=str,
        chunks=(shard_rows,),
        compressors=_SMALL_CODECS,
        fill_value="",
        dimension_names=("sample",),
        config=WRITE_EVERY_CHUNK,
    )
    valid[...], error[...] = False, ""


def create_splits(group: zarr.Group, masks: Mapping[str, np.ndarray]) -> None:
    for name, mask in masks.items():
        group.create_array(
            name,
            data=mask,
            chunks=(min(len(mask), _SAMPLE_CHUNK),),
            compressors=_SMALL_CODECS,
            dimension_names=("sample",),
            config=WRITE_EVERY_CHUNK,
        )
