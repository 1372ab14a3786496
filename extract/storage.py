"""The storage choices a spec may name (dtypes and compressions) and their sizes.

No zarr here: the spec reads these without importing the store, which is most of a `spec check`'s start-up
(importing extract.store took 0.88 s of extract.spec's 1.68 s).
"""

from __future__ import annotations

STORAGE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("blosc-lz4", "zstd", "none")
_ITEMSIZE = {"float16": 2, "float32": 4}


def itemsize(dtype: str) -> int:
    """Bytes per stored value of a storage dtype."""
    if dtype not in _ITEMSIZE:
        raise ValueError(f"storage dtype {dtype!r} not supported; use one of {STORAGE_DTYPES}")
    return _ITEMSIZE[dtype]
