"""Target resolutions for native-aspect-ratio images (NaViT section 3.2).

Conventions, shared by every function here:
- A sampled "side" s sets the image's area to s * s pixels, aspect ratio kept: the scale is
  s / sqrt(h * w). The side is the geometric mean of height and width, so the patch count
  ~(s / P)^2 does not depend on the aspect ratio (a 1:20 strip costs as many tokens as a
  square of the same side). NaViT samples the side length (not the area) of an image of
  r^2 pixels; this is that reading.
- The scale is capped at `max_upscale` (small images are not blown up past it).
- Sizes are rounded to the nearest multiple of the patch size P, each side at least P, so
  patchify never crops and every image has at least one patch. Height and width therefore
  each differ from the exact scaled size by at most P / 2 (except where raised to P).
- A sequence of `max_patches` tokens is never overflowed: an image whose grid has more
  patches is shrunk, aspect kept, to the largest grid that fits. Never cut, never an error.
- The one exception to the kept aspect ratio is kind "square", the fixed-resolution ViT
  baseline: every image is squashed to square_side x square_side (rounded to patches).

All sizes are (height, width) in pixels, Python ints. Randomness comes only from the
`np.random.Generator` passed in, so a seeded generator gives the same sizes every run.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from navit_clip.choices import check_choice, check_range

KINDS = ("uniform_side", "truncnorm_side", "fixed_area", "patch_budget", "square")


def check_config(cfg: ml_collections.ConfigDict | ResolutionSampler,
                 prefix: str = "config.data.resolution.") -> None:
  """Checks config.data.resolution, or the same fields of a ResolutionSampler.

  `prefix` + field name names a field in the errors ("config.data.resolution.kind").
  """
  check_choice(f"{prefix}kind", cfg.kind, KINDS)
  if not 0 < cfg.min_side <= cfg.max_side:
    raise ValueError(f"{prefix}min_side = {cfg.min_side} and {prefix}max_side = "
                     f"{cfg.max_side} need 0 < min_side <= max_side")
  check_range(f"{prefix}max_upscale", cfg.max_upscale, 0.0, low_open=True)
  check_range(f"{prefix}area", cfg.area, 0.0, low_open=True)
  check_range(f"{prefix}patch_budget", cfg.patch_budget, 1)
  check_range(f"{prefix}square_side", cfg.square_side, 1)


def _check_hw(h: int, w: int) -> None:
  if int(h) != h or int(w) != w or h < 1 or w < 1:
    raise ValueError(f"image size must be positive integers (height, width), got ({h}, {w})")


def _grid(h: int, w: int, scale: float, patch_size: int) -> tuple[int, int]:
  """Patch grid (rows, cols) of an (h, w) image scaled by `scale`, rounded to nearest."""
  gh = max(1, math.floor(h * scale / patch_size + 0.5))
  gw = max(1, math.floor(w * scale / patch_size + 0.5))
  return gh, gw


def size_for_side(h: int, w: int, side: float, patch_size: int,
                  max_upscale: float = math.inf) -> tuple[int, int]:
  """Size of an (h, w) image resized to area side^2 (aspect kept), rounded to patches.

  Args:
    h, w: native size in pixels.
    side: target geometric-mean side in pixels (> 0).
    patch_size: P; the result is a multiple of P on both sides, at least P.
    max_upscale: the scale never exceeds this factor.

  Returns:
    (height, width) in pixels.
  """
  _check_hw(h, w)
  if not side > 0:
    raise ValueError(f"side must be > 0, got {side}")
  scale = min(side / math.sqrt(h * w), max_upscale)
  gh, gw = _grid(h, w, scale, patch_size)
  return gh * patch_size, gw * patch_size


def fit_patch_budget(h: int, w: int, patch_size: int, budget: int,
                     max_upscale: float = math.inf) -> tuple[int, int]:
  """The largest patch-rounded size of an (h, w) image with at most `budget` patches.

  The scale s is the largest (up to `max_upscale`) for which the rounded grid
  round(h s / P) x round(w s / P) (each side >= 1) has at most `budget` patches. For
  inference at a token budget and for shrinking images that overflow a sequence.

  Returns:
    (height, width) in pixels, multiples of `patch_size`.
  """
  _check_hw(h, w)
  if budget < 1:
    raise ValueError(f"patch budget must be >= 1, got {budget}")

  def fits(scale: float) -> bool:
    gh, gw = _grid(h, w, scale, patch_size)
    return gh * gw <= budget

  hi = min(max_upscale, patch_size * (budget + 1) / min(h, w))
  if fits(hi):
    lo = hi
  else:
    lo = 0.0  # grid (1, 1): always fits.
    for _ in range(64):
      mid = 0.5 * (lo + hi)
      if fits(mid):
        lo = mid
      else:
        hi = mid
  gh, gw = _grid(h, w, lo, patch_size)
  return gh * patch_size, gw * patch_size


def naflex_size(h: int, w: int, patch_size: int, max_patches: int) -> tuple[int, int]:
  """The size SigLIP 2 NaFlex's image processor resizes an (h, w) image to.

  Unlike `fit_patch_budget`, each side is rounded UP to a multiple of the patch size (at
  least one patch), and the scale is the largest that a bisection of [1e-6, 100] to within
  1e-5 finds with at most `max_patches` patches: the same steps, so the same sizes.

  Returns:
    (height, width) in pixels, multiples of `patch_size`.
  """
  _check_hw(h, w)
  if max_patches < 1:
    raise ValueError(f"max_patches must be >= 1, got {max_patches}")

  def side(n: int, scale: float) -> int:
    return max(patch_size, math.ceil(n * scale / patch_size) * patch_size)

  lo, hi = 1e-6, 100.0
  while hi - lo >= 1e-5:
    mid = (lo + hi) / 2
    if (side(h, mid) // patch_size) * (side(w, mid) // patch_size) <= max_patches:
      lo = mid
    else:
      hi = mid
  return side(h, lo), side(w, lo)


def uniform_side(rng: np.random.Generator, lo: float, hi: float) -> float:
  """A side length ~ U(lo, hi) in pixels."""
  return float(rng.uniform(lo, hi))


def truncnorm_side(rng: np.random.Generator, lo: float, hi: float, mean: float = -0.5,
                   std: float = 1.0) -> float:
  """A side length z ~ N(mean, std) truncated to [-1, 1], mapped linearly onto [lo, hi].

  With the defaults this is NaViT's distribution biased to low resolutions.
  """
  accept = 0.5 * (math.erf((1 - mean) / (std * math.sqrt(2)))
                  - math.erf((-1 - mean) / (std * math.sqrt(2))))
  if not std > 0 or accept < 1e-4:
    raise ValueError(f"truncated normal N({mean}, {std}) puts too little mass on [-1, 1] "
                     f"(acceptance {accept:.2g})")
  while True:
    z = rng.normal(mean, std)
    if -1.0 <= z <= 1.0:
      return float(lo + (z + 1.0) * 0.5 * (hi - lo))


@dataclasses.dataclass(frozen=True)
class ResolutionSampler:
  """Samples the target size of each image; built from `config.data.resolution`.

  kind: uniform_side (side ~ U(min_side, max_side)), truncnorm_side (NaViT's N_t over
  [min_side, max_side]), fixed_area (side = sqrt(area)), patch_budget (largest size with
  at most `patch_budget` patches; deterministic, for evaluation), square (every image
  squashed to square_side x square_side, aspect not kept: the fixed-resolution ViT). The
  result never has more than `max_patches` patches (the sequence length L).
  """

  kind: str
  patch_size: int
  max_patches: int
  min_side: float = 64
  max_side: float = 256
  truncnorm_mean: float = -0.5
  truncnorm_std: float = 1.0
  area: float = 224 * 224
  patch_budget: int = 256
  square_side: int = 224
  max_upscale: float = 2.0

  def __post_init__(self):
    check_config(self, prefix="resolution ")
    if self.patch_size < 1 or self.max_patches < 1:
      raise ValueError(f"patch_size ({self.patch_size}) and max_patches "
                       f"({self.max_patches}) must be >= 1")

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, patch_size: int,
                  max_patches: int) -> ResolutionSampler:
    """From `config.data.resolution`; `max_patches` is usually `config.data.seq_len`."""
    return cls(kind=cfg.kind, patch_size=patch_size, max_patches=max_patches,
               min_side=cfg.min_side, max_side=cfg.max_side,
               truncnorm_mean=cfg.truncnorm_mean, truncnorm_std=cfg.truncnorm_std,
               area=cfg.area, patch_budget=cfg.patch_budget, square_side=cfg.square_side,
               max_upscale=cfg.max_upscale)

  def __call__(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int]:
    """Target (height, width) in pixels for an image of native size (h, w)."""
    height, width, _ = self.sample(rng, h, w)
    return height, width

  def sample(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, bool]:
    """(height, width, shrunk) for an image of native size (h, w).

    `shrunk` is True when the sampled size had more than `max_patches` patches and was
    shrunk to fit the sequence: a spike of images at the row length, not the distribution.
    """
    budget = self.max_patches
    if self.kind == "square":
      return self._square()
    if self.kind == "patch_budget":
      size = fit_patch_budget(h, w, self.patch_size, min(budget, self.patch_budget),
                              self.max_upscale)
      wanted = (fit_patch_budget(h, w, self.patch_size, self.patch_budget, self.max_upscale)
                if self.patch_budget > budget else size)
      return (*size, self._patches(wanted) > budget)
    if self.kind == "uniform_side":
      side = uniform_side(rng, self.min_side, self.max_side)
    elif self.kind == "truncnorm_side":
      side = truncnorm_side(rng, self.min_side, self.max_side, self.truncnorm_mean,
                            self.truncnorm_std)
    else:
      side = math.sqrt(self.area)
    size = size_for_side(h, w, side, self.patch_size, self.max_upscale)
    if self._patches(size) <= budget:
      return (*size, False)
    scale = min(side / math.sqrt(h * w), self.max_upscale)
    return (*fit_patch_budget(h, w, self.patch_size, budget, max_upscale=scale), True)

  def _square(self) -> tuple[int, int, bool]:
    """(side, side, shrunk): square_side rounded to the nearest patch (at least one), shrunk
    to the largest square grid of at most `max_patches` patches when it has more."""
    grid = max(1, math.floor(self.square_side / self.patch_size + 0.5))
    fits = min(grid, math.isqrt(self.max_patches))
    return fits * self.patch_size, fits * self.patch_size, fits < grid

  def _patches(self, size_hw: tuple[int, int]) -> int:
    return (size_hw[0] // self.patch_size) * (size_hw[1] // self.patch_size)

  def shrink_share(self, num_draws: int = 2000, seed: int = 0) -> float:
    """The share of images shrunk to fit `max_patches`, over `num_draws` sizes sampled for
    a square image of side `max_side` (or of `area`: large enough that the upscale cap
    does not bind)."""
    if self.kind in ("fixed_area", "patch_budget", "square"):
      num_draws = 1  # one size per native size
    rng = np.random.default_rng(seed)
    side = math.ceil(max(self.max_side, math.sqrt(self.area)))
    return sum(self.sample(rng, side, side)[2] for _ in range(num_draws)) / num_draws
