"""Resolution sampling: determinism, ranges, aspect ratio, patch rounding, budgets."""

import math

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from navit_clip.config import default_config
from navit_clip.data.resolution_sampling import (ResolutionSampler, check_config,
                                                 fit_patch_budget, naflex_size, size_for_side,
                                                 truncnorm_side, uniform_side)

P = 16
sizes = st.integers(1, 30_000)


def consistent_scale(h, w, out_h, out_w, patch):
  """True if one scale s puts each side within P/2 of s * native (or at the 1-patch floor)."""
  def interval(native, out):
    lo = 0.0 if out == patch else (out - patch / 2) / native
    return lo, (out + patch / 2) / native
  (a, b), (c, d) = interval(h, out_h), interval(w, out_w)
  return max(a, c) <= min(b, d) * (1 + 1e-12)


@given(h=sizes, w=sizes, side=st.floats(1, 2000), up=st.floats(0.1, 8))
def test_size_for_side_rounds_to_patches_and_keeps_aspect(h, w, side, up):
  out_h, out_w = size_for_side(h, w, side, P, up)
  assert out_h % P == 0 and out_w % P == 0 and out_h >= P and out_w >= P
  scale = min(side / math.sqrt(h * w), up)
  for native, out in ((h, out_h), (w, out_w)):
    assert out == P or abs(out - native * scale) <= P / 2 + 1e-6


@settings(max_examples=60)
@given(h=sizes, w=sizes, budget=st.integers(1, 600), up=st.sampled_from([0.5, 2.0, math.inf]))
def test_fit_patch_budget_is_the_largest_grid_that_fits(h, w, budget, up):
  out_h, out_w = fit_patch_budget(h, w, P, budget, up)
  got = (out_h // P) * (out_w // P)
  assert got <= budget
  assert consistent_scale(h, w, out_h, out_w, P)
  # Brute force: the grid only changes where a side crosses k + 1/2 patches.
  best = 1
  for native in (h, w):
    for k in range(1, budget + 2):
      s = (k - 0.5) * P / native * (1 + 1e-9)
      if s > up:
        break
      gh = max(1, math.floor(h * s / P + 0.5))
      gw = max(1, math.floor(w * s / P + 0.5))
      if gh * gw <= budget:
        best = max(best, gh * gw)
  if up < math.inf:
    gh, gw = (max(1, math.floor(n * up / P + 0.5)) for n in (h, w))
    if gh * gw <= budget:
      best = max(best, gh * gw)
  assert got == best


@pytest.mark.parametrize("hw", [(1, 1), (1, 20), (20, 1), (16, 320), (100_000, 100_000),
                                (5, 100_000), (375, 500)])
@pytest.mark.parametrize("kind", ["uniform_side", "truncnorm_side", "fixed_area",
                                  "patch_budget"])
def test_sampler_extremes_fit_the_sequence(hw, kind):
  sampler = ResolutionSampler(kind, patch_size=P, max_patches=64, min_side=64, max_side=384,
                              area=224 * 224, patch_budget=100)
  rng = np.random.default_rng(0)
  for _ in range(20):
    out_h, out_w = sampler(rng, *hw)
    assert out_h % P == 0 and out_w % P == 0 and out_h >= P and out_w >= P
    assert (out_h // P) * (out_w // P) <= 64
    assert consistent_scale(*hw, out_h, out_w, P)


def test_sampler_is_deterministic_for_a_seed():
  sampler = ResolutionSampler("truncnorm_side", P, 1024, 64, 384)
  draw = lambda seed: [sampler(np.random.default_rng(seed), 375, 500) for _ in range(5)]
  assert draw(3) == draw(3)
  assert draw(3) != draw(4)


def test_side_distributions_ranges_and_bias():
  rng = np.random.default_rng(0)
  uni = np.array([uniform_side(rng, 64, 384) for _ in range(4000)])
  tn = np.array([truncnorm_side(rng, 64, 384) for _ in range(4000)])
  assert uni.min() >= 64 and uni.max() <= 384 and abs(uni.mean() - 224) < 6
  assert tn.min() >= 64 and tn.max() <= 384
  # N(-0.5, 1) truncated to [-1, 1] has mean about -0.1: below the middle (224 px).
  z_mean = (tn.mean() - 64) / 160 - 1
  assert -0.16 < z_mean < -0.05


def test_uniform_side_patch_counts_span_the_range():
  sampler = ResolutionSampler("uniform_side", P, 10_000, 64, 384, max_upscale=4)
  rng = np.random.default_rng(1)
  counts = [np.prod(sampler(rng, 480, 480)) // P**2 for _ in range(500)]
  assert min(counts) <= 20 and max(counts) >= 500  # (64/16)^2 = 16 ... (384/16)^2 = 576


def test_max_upscale_caps_small_images():
  assert size_for_side(40, 40, 384, P, max_upscale=2.0) == (80, 80)
  assert size_for_side(3, 3, 384, P, max_upscale=2.0) == (P, P)  # one patch at least


def test_fixed_area_gives_that_many_patches():
  sampler = ResolutionSampler("fixed_area", P, 10_000, area=224 * 224)
  out_h, out_w = sampler(np.random.default_rng(0), 1000, 1000)
  assert (out_h, out_w) == (224, 224)


def test_fit_patch_budget_without_upscale_only_shrinks_when_needed():
  # max_upscale = 1: the native size rounded to patches, shrunk only to fit (inference's
  # "native" policy).
  assert fit_patch_budget(64, 96, P, 256, max_upscale=1.0) == (64, 96)
  assert fit_patch_budget(60, 100, P, 256, max_upscale=1.0) == (64, 96)
  out_h, out_w = fit_patch_budget(480, 640, P, 256, max_upscale=1.0)
  assert (out_h // P) * (out_w // P) <= 256 and out_h < 480 and out_w < 640
  assert consistent_scale(480, 640, out_h, out_w, P)


def test_from_config_and_bad_inputs():
  cfg = default_config()
  sampler = ResolutionSampler.from_config(cfg.data.resolution, P, cfg.data.seq_len)
  assert sampler.kind == cfg.data.resolution.kind
  with pytest.raises(ValueError, match="resolution kind"):
    ResolutionSampler("area", P, 256)
  with pytest.raises(ValueError, match="image size"):
    size_for_side(0, 10, 64, P)
  with pytest.raises(ValueError, match="too little mass"):
    truncnorm_side(np.random.default_rng(0), 64, 384, mean=50.0, std=1.0)


@pytest.mark.parametrize("hw,patch,budget,want", [
    # Sizes that transformers' Siglip2ImageProcessor gives: the scale stops at 100 for a
    # 1 x 1 image, and a 1:600 strip keeps one row of patches.
    ((8, 40), 4, 64, (16, 64)), ((40, 8), 4, 64, (64, 16)), ((20, 36), 4, 64, (24, 40)),
    ((17, 29), 4, 24, (16, 24)), ((48, 48), 4, 24, (16, 16)),
    ((1, 1), 16, 256, (112, 112)), ((5, 3000), 16, 256, (16, 4096)),
])
def test_naflex_size_rounds_up_and_fits_the_budget(hw, patch, budget, want):
  got = naflex_size(*hw, patch, budget)
  assert got == want
  assert (got[0] // patch) * (got[1] // patch) <= budget


def test_square_squashes_every_image_to_one_side_and_fits_the_sequence():
  sampler = ResolutionSampler("square", P, 64, square_side=100)  # rounds to 6 x 6 patches
  rng = np.random.default_rng(0)
  for hw in [(1, 1), (20, 1), (375, 500), (100_000, 7)]:
    assert sampler.sample(rng, *hw) == (96, 96, False)
  assert ResolutionSampler("square", P, 64, square_side=4).sample(rng, 30, 90) == (P, P, False)
  shrunk = ResolutionSampler("square", P, 30, square_side=224)  # 14 x 14 > 30: 5 x 5
  assert shrunk.sample(rng, 480, 640) == (80, 80, True)
  assert shrunk.shrink_share() == 1.0
  cfg = default_config().data.resolution
  cfg.kind, cfg.square_side = "square", 48
  assert ResolutionSampler.from_config(cfg, 8, 36).sample(rng, 64, 192) == (48, 48, False)
  cfg.square_side = 0
  with pytest.raises(ValueError, match="config.data.resolution.square_side"):
    check_config(cfg)
