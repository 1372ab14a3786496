"""extract/preprocess.py: guided-diffusion's center_crop_arr, the [-1, 1] scaling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extract.preprocess import center_crop_arr, preprocess, reference, to_model_range


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    # Smooth structure plus noise, so resampling filters give visibly different results.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def test_matches_hand_computation_on_a_non_square_image():
    arr = photo(70, 150)  # H=70, W=150; target 32
    # By hand: min side 70 >= 64 -> one BOX halving to (75, 35); 35 < 64 stops. scale = 32/35:
    # BICUBIC to (round(75*32/35), round(35*32/35)) = (69, 32); crop x from (69-32)//2 = 18, y from 0.
    step = Image.fromarray(arr).resize((75, 35), resample=Image.BOX)
    step = step.resize((69, 32), resample=Image.BICUBIC)
    expected = np.asarray(step)[0:32, 18:50]
    got = center_crop_arr(arr, 32)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    # The BOX halving matters: a direct bicubic resize differs.
    direct = np.asarray(Image.fromarray(arr).resize((69, 32), resample=Image.BICUBIC))[0:32, 18:50]
    assert not np.array_equal(got, direct)


def test_tall_image_and_repeated_halvings():
    arr = photo(530, 140, seed=1)  # halvings: 140 >= 64 -> (70, 265); 70 >= 64 -> (35, 132); then bicubic
    step = Image.fromarray(arr).resize((70, 265), resample=Image.BOX).resize((35, 132), resample=Image.BOX)
    step = step.resize((32, round(132 * 32 / 35)), resample=Image.BICUBIC)  # (32, 121)
    expected = np.asarray(step)[(121 - 32) // 2 : (121 - 32) // 2 + 32, 0:32]
    np.testing.assert_array_equal(center_crop_arr(arr, 32), expected)


def test_small_images_are_upscaled_by_the_same_bicubic_step():
    gray = photo(28, 28)[:, :, 0]
    expected = np.asarray(Image.fromarray(gray).convert("RGB").resize((32, 32), resample=Image.BICUBIC))
    np.testing.assert_array_equal(center_crop_arr(gray, 32), expected)


def test_grayscale_becomes_three_equal_channels():
    gray = photo(40, 50)[:, :, 0]
    out = reference(gray, 32)
    assert out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(reference(gray[:, :, None], 32), out)  # (H, W, 1) too
    np.testing.assert_array_equal(reference(Image.fromarray(gray), 32), out)  # a PIL image too


def test_rgba_drops_alpha_and_pil_equals_array():
    rgba = np.concatenate([photo(33, 47), np.full((33, 47, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(reference(rgba, 32), reference(rgba[:, :, :3], 32))
    np.testing.assert_array_equal(reference(Image.fromarray(rgba[:, :, :3]), 32), reference(rgba[:, :, :3], 32))


def test_scaling_to_minus_one_one():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, 16:] = 255
    out = to_model_range(arr)
    assert out.dtype == np.float32 and out.shape == (3, 32, 32)
    assert out.min() == -1.0 and out.max() == 1.0
    mid = to_model_range(np.full((1, 1, 3), 127, np.uint8))[0, 0, 0]
    assert mid == np.float32(127) / np.float32(127.5) - np.float32(1)  # float32 arithmetic, as the reference
    x = preprocess(photo(64, 96), 32)
    assert x.shape == (3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(ValueError, match="unknown preprocessing"):
        preprocess(photo(8, 8), 8, method="imagenet")


def test_batch_scaling_on_the_device_equals_the_reference_for_every_value():
    import torch

    from extract.preprocess import batch_to_model_range, pixels

    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    got = batch_to_model_range(torch.from_numpy(every[None]))
    assert got.dtype == torch.float32 and got.shape == (1, 3, 16, 16)
    assert got[0].numpy().tobytes() == to_model_range(every).tobytes()
    image = photo(70, 150)
    assert batch_to_model_range(torch.from_numpy(pixels(image, 32)[None]))[0].numpy().tobytes() == (
        preprocess(image, 32).tobytes()
    )
    with pytest.raises(TypeError, match="uint8"):
        batch_to_model_range(torch.zeros(1, 4, 4, 3))
