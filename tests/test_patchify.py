"""Patchify layout and resize."""

from hypothesis import given, strategies as st
import numpy as np
import pytest

from navit_clip.data.patchify import patchify, resize
from navit_clip.data.token_drop import drop_tokens, kept_tokens


@given(gh=st.integers(1, 5), gw=st.integers(1, 5), p=st.integers(1, 4), c=st.integers(1, 4),
       seed=st.integers(0, 2**31))
def test_patches_are_row_major_tiles(gh, gw, p, c, seed):
  image = np.random.default_rng(seed).integers(0, 256, (gh * p, gw * p, c), np.uint8)
  patches, positions, grid_hw = patchify(image, p)
  assert patches.dtype == np.uint8 and patches.shape == (gh * gw, p * p * c)
  assert positions.dtype == np.int32 and grid_hw.dtype == np.int32
  assert grid_hw.tolist() == [gh, gw]
  for i, (r, col) in enumerate(positions):
    assert (r, col) == divmod(i, gw)
    tile = image[r * p:(r + 1) * p, col * p:(col + 1) * p]
    np.testing.assert_array_equal(patches[i], tile.reshape(-1))


def test_patchify_takes_strided_views():
  """Flipped, cropped and channel-sliced views patchify like their contiguous copies."""
  image = np.random.default_rng(0).integers(0, 256, (20, 28, 4), np.uint8)
  for view in (image[::-1, :, :3], image[2:18, 4:28, :3], image[:, ::-1], image[..., 1:2]):
    got = patchify(view, 4)
    for field, expected in zip(got, patchify(np.ascontiguousarray(view), 4)):
      np.testing.assert_array_equal(field, expected)
    assert got[0].flags.c_contiguous


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.9])
def test_patchify_copies_only_the_kept_patches(rate):
  """keep = kept_tokens(...) gives drop_tokens' result on the whole grid, same draws."""
  image = np.random.default_rng(1).integers(0, 256, (24, 36, 3), np.uint8)
  patches, positions, grid_hw = patchify(image, 4)
  want = drop_tokens(np.random.default_rng(5), patches, positions, rate)
  keep = kept_tokens(np.random.default_rng(5), len(patches), rate)
  got = patchify(image, 4, keep)
  np.testing.assert_array_equal(keep, want[2])
  for field, expected in zip(got, (*want[:2], grid_hw)):
    np.testing.assert_array_equal(field, expected)
  for bad in (np.array([54]), np.array([-1, 3]), np.array([], np.int64)):
    with pytest.raises(ValueError, match="keep must index 1..54"):
      patchify(image, 4, bad)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((4, 4), np.uint8), r"\[H, W, C\]"),
    (np.zeros((4, 6, 3), np.uint8), "not a multiple of patch size 4"),
])
def test_patchify_rejects_bad_images(bad, match):
  with pytest.raises(ValueError, match=match):
    patchify(bad, 4)


@pytest.mark.parametrize("c", [1, 3, 4])
def test_resize_shapes_and_constant_colour(c):
  image = np.full((37, 53, c), 200, np.uint8)
  out = resize(image, (32, 80))
  assert out.shape == (32, 80, c) and out.dtype == np.uint8
  assert np.all(out == 200)
  assert resize(image, (37, 53)) is image


def test_resize_antialiases_when_shrinking():
  stripes = np.zeros((64, 64, 3), np.uint8)
  stripes[:, ::2] = 255  # 1-pixel stripes: a box-filtered shrink is uniform grey
  out = resize(stripes, (16, 16)).astype(int)
  assert np.all(np.abs(out - 127) < 20)


def test_resize_rejects_bad_target():
  with pytest.raises(ValueError, match="resize target"):
    resize(np.zeros((4, 4, 3), np.uint8), (0, 4))
