"""Images as users have them: 16-bit, CMYK, palette with transparency, LA, I;16 variants, bilevel, each
against a reference conversion; and corrupt, truncated, empty and odd files recorded, not fatal."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from extract.models.config import TINY_FLAGS
from extract.sources.base import decode_image_file, to_rgb_array

from .conftest import cli

RNG = np.random.default_rng(0)


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA), which Pillow can read but not write."""
    h, w, c = arr.shape
    kind = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, kind, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _gray3(gray8: np.ndarray) -> np.ndarray:
    return np.repeat(gray8[:, :, None], 3, axis=2)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, channels):
    wide = RNG.integers(0, 65536, (6, 9, channels), dtype=np.uint16)
    path = tmp_path / "x.png"
    path.write_bytes(_png16(wide))
    got = decode_image_file(path)
    high = (wide >> 8).astype(np.uint8)  # the reference: the high byte, as Pillow reduces 16-bit RGB
    want = _gray3(high[:, :, 0]) if channels <= 2 else high[:, :, :3]
    np.testing.assert_array_equal(got, want)
    assert (got == 255).mean() < 0.05  # the old convert("RGB") turned almost every pixel white


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_wide_grayscale_modes(mode):
    wide = RNG.integers(0, 65536, (5, 4)).astype(np.uint16)
    if mode == "I":
        image = Image.fromarray(wide.astype(np.int32), mode="I")
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (4, 5), wide.astype(dtype).tobytes())
    np.testing.assert_array_equal(to_rgb_array(image), _gray3((wide >> 8).astype(np.uint8)))


def test_cmyk_converts_as_the_reference():
    cmyk = RNG.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    got = to_rgb_array(Image.fromarray(cmyk, mode="CMYK"))
    # Pillow's (and so guided-diffusion's) CMYK -> RGB: (255 - C)(255 - K) / 255, rounded as Pillow's MULDIV255
    product = (255 - cmyk[:, :, :3].astype(int)) * (255 - cmyk[:, :, 3:4].astype(int)) + 128
    want = (product + (product >> 8)) >> 8
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_palette_with_transparency_shows_palette_colours(recwarn):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.tobytes())
    image.info["transparency"] = bytes(range(256))  # per-entry alpha, as in PNGs with tRNS
    np.testing.assert_array_equal(to_rgb_array(image), palette[index])  # alpha ignored, as the reference
    assert not [w for w in recwarn if "Transparency" in str(w.message)]


@pytest.mark.parametrize("mode", ["LA", "L", "1"])
def test_gray_alpha_and_bilevel(mode):
    gray = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    if mode == "LA":
        image = Image.fromarray(np.stack([gray, 255 - gray], axis=2), mode="LA")
        want = gray
    elif mode == "L":
        image, want = Image.fromarray(gray, mode="L"), gray
    else:
        image = Image.fromarray(gray > 127).convert("1")
        want = np.where(gray > 127, 255, 0).astype(np.uint8)
    np.testing.assert_array_equal(to_rgb_array(image), _gray3(want))


def test_exif_orientation_is_ignored_like_the_reference(tmp_path):
    pixels = RNG.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=100)
    got = decode_image_file(tmp_path / "r.jpg")
    assert got.shape == (4, 8, 3)  # stored orientation, as guided-diffusion reads it


def _bad_and_odd_folder(root):
    good = root / "a"
    good.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(good / f"{i}.png")
    odd = root / "b"
    odd.mkdir()
    (odd / "wide16.png").write_bytes(_png16(RNG.integers(0, 65536, (20, 20, 1), dtype=np.uint16)))
    Image.fromarray(RNG.integers(0, 256, (1, 300, 3), dtype=np.uint8)).save(odd / "sliver.png")  # 1 px tall
    Image.fromarray(RNG.integers(0, 256, (1, 1), dtype=np.uint8)).save(odd / "dot.gif")
    Image.fromarray(RNG.integers(0, 256, (20, 20, 4), dtype=np.uint8), mode="CMYK").save(odd / "cmyk.jpg")
    broken = {
        "truncated.png": (good / "0.png").read_bytes()[:60],
        "empty.jpg": b"",
        "noise.jpg": RNG.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "text.png": b"this is not an image\n",
    }
    for name, data in broken.items():
        (odd / name).write_bytes(data)
    return sorted(f"b/{n}" for n in broken)


def test_corrupt_truncated_empty_and_odd_images(tmp_path):
    from extract.store import open_store

    broken = _bad_and_odd_folder(tmp_path / "imgs")
    spec = {
        "model": {"flags": dict(TINY_FLAGS)},
        "dataset": {"kind": "folder", "path": str(tmp_path / "imgs")},
        "features": {"timesteps": [10], "blocks": [2], "pooling": [1]},
        "storage": {"shard_rows": 4, "chunk_rows": 2},
        "compute": {"device": "cpu"},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    store = tmp_path / "s.zarr"
    result = cli("extract", str(spec_path), "--store", str(store), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "4 image(s) failed and are marked invalid" in result.output
    fs = open_store(store)
    assert sorted(f["id"] for f in fs.failures) == broken
    assert all(f["reason"] for f in fs.failures)
    assert fs.valid.sum() == fs.num_samples - len(broken) and fs.is_complete()
    # strict mode stops at the first one, naming it, in one clean line plus the resume advice
    strict = cli("extract", str(spec_path), "--store", str(tmp_path / "strict.zarr"), "--no-progress", "--strict")
    assert strict.exit_code == 1 and "unreadable image b/" in strict.output and "Traceback" not in strict.output
