"""extract/loader.py: the same pixels from this process, from threads and from loader processes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extract.loader import Loader, load_pixels
from extract.preprocess import pixels
from extract.sources import FolderSource


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / "c" / f"{i}.jpg")
    (tmp_path / "c" / "broken.jpg").write_bytes(b"not a jpeg")
    return FolderSource(tmp_path)


def test_pixels_and_failures_of_one_batch(folder):
    got = load_pixels(folder, 32, "reference", 3, 8, np.arange(len(folder)))
    assert (got.unit, got.offset) == (3, 8) and got.pixels.shape == (11, 32, 32, 3) and got.pixels.dtype == np.uint8
    assert got.ids[-1] == "c/broken.jpg" and "cannot identify image file" in got.errors[-1]
    assert not any(got.errors[:-1]) and not got.pixels[-1].any()  # a failed row stays zero
    np.testing.assert_array_equal(got.pixels[1], pixels(folder.load(1).image, 32))


@pytest.mark.parametrize("processes", [0, 2])
def test_loader_threads_and_processes_give_the_same_bytes(folder, processes):
    expected = load_pixels(folder, 32, "reference", 0, 0, np.arange(len(folder)))
    with Loader(folder, 32, "reference", processes=processes) as loader:
        parts = [loader.submit(0, lo, np.arange(lo, min(lo + 4, len(folder)))) for lo in range(0, len(folder), 4)]
        got = [f.result() for f in parts]
    assert np.concatenate([g.pixels for g in got]).tobytes() == expected.pixels.tobytes()
    assert sum((g.errors for g in got), []) == expected.errors and sum((g.ids for g in got), []) == expected.ids
