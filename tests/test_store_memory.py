"""Reused read memory: never hands out what a caller holds, reuses what was dropped, gives back what does not fit."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from extract.store.memory import ReusedMemory, allocation, cast_into, scatter_into


def test_held_memory_is_never_handed_out_again_and_dropped_memory_is():
    pool = ReusedMemory(keep=4)
    a = pool.take((10, 3))
    a[:] = 1
    view = a[2:4]  # a view alone keeps the memory held
    del a
    b = pool.take((10, 3))
    assert not np.shares_memory(b, view)
    np.testing.assert_array_equal(view, 1)
    base = weakref.ref(allocation(b))
    del b
    c = pool.take((6, 3))  # 18 of 30 elements: at least half, so the dropped memory serves
    assert allocation(c) is base()


def test_memory_that_does_not_fit_is_given_back_before_more_is_taken():
    pool = ReusedMemory(keep=4)
    big = pool.take((100, 4))
    base = weakref.ref(allocation(big))
    del big
    small = pool.take((10, 4))  # under half: new memory, and the free 400 elements are released first
    gc.collect()
    assert base() is None and allocation(small).size == 40
    other = weakref.ref(allocation(small))
    del small
    pool.release()
    assert other() is None


def test_a_reserve_lets_a_short_last_block_reuse_a_full_one():
    pool = ReusedMemory(keep=4)
    full = pool.take((8, 2), reserve=16)
    base = weakref.ref(allocation(full))
    del full
    assert allocation(pool.take((1, 2), reserve=16)) is base()


def test_cast_and_scatter():
    src = np.arange(12, dtype=np.float16).reshape(4, 3)
    dst = np.empty((4, 3), np.float32)
    cast_into(dst, src)
    np.testing.assert_array_equal(dst, src.astype(np.float32))
    out = np.zeros((5, 3), np.float32)
    scatter_into(out, np.array([4, 0, 2]), dst[:3])
    np.testing.assert_array_equal(out[[4, 0, 2]], dst[:3])
    np.testing.assert_array_equal(out[[1, 3]], 0)
