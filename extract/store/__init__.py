"""The feature store (Zarr v3): layout, creation, writer, reader and tools.

`layout` and `shards` are the only code that knows the disk format (`shards`: the bytes inside a shard). The store imports no spec, no model and no
CLI: what it records about a spec arrives as plain data, and checks that need a spec (may a new spec
extend this store? what is the recorded spec's fingerprint?) arrive as functions from the caller.
"""

from extract.store.create import ExtensionCheck, NewStore, create_store
from extract.store.layout import (
    FEATURE_DIMS,
    FLOAT16_MAX,
    FORMAT_VERSION,
    FeatureInfo,
    FingerprintMismatch,
    Layout,
    StoreError,
    plan_layout,
)
from extract.store.reader import FeatureStore, open_store
from extract.store.tools import export_hdf5, info, save_features
from extract.store.verify import VerifyReport, verify
from extract.store.writer import StoreWriter, cast_with_stats

__all__ = [
    "FEATURE_DIMS",
    "FLOAT16_MAX",
    "FORMAT_VERSION",
    "ExtensionCheck",
    "FeatureInfo",
    "FeatureStore",
    "FingerprintMismatch",
    "Layout",
    "NewStore",
    "StoreError",
    "StoreWriter",
    "VerifyReport",
    "cast_with_stats",
    "create_store",
    "export_hdf5",
    "info",
    "open_store",
    "plan_layout",
    "save_features",
    "verify",
]
