"""Continuous token dropping: a random subset of each image's patches (NaViT section 3.3).

The drop rate is drawn per image (`TokenDropper.rate`), then that fraction of the image's
patches is removed uniformly at random (`drop_tokens`). Positions travel with their patches
and the image's grid size is unchanged, so the model still knows where each kept patch was.

Rate kinds (`config.data.token_drop`):
- constant: d = rate.
- beta: u ~ Beta(a, b) with mean u_mu = rate / max_rate and variance 0.3 u_mu (1 - u_mu),
  d = u * max_rate (appendix B.6). The variance fixes a + b = 1 / 0.3 - 1.
- resolution: d ~ N(mu, resolution_std) with draws beyond 2 std rejected, mu rising linearly
  from min_rate at `min_tokens` patches to max_rate at `max_tokens` (clamped outside).
- schedule (constant and beta): the rate (the mean, for beta) follows a sigmoid over the
  images seen, from schedule_start at image 0 to schedule_end at `schedule_images`. The
  images seen are the whole run's, over all processes (`Preprocessor` counts them).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from navit_clip.choices import check_choice, check_range

KINDS = ("none", "constant", "beta", "resolution")
_BETA_VARIANCE = 0.3  # variance of u as a fraction of u_mu (1 - u_mu)
_SIGMOID_STEEPNESS = 12.0  # the schedule's sigmoid spans [-6, 6] over schedule_images
_RATES = ("rate", "max_rate", "min_rate", "schedule_start", "schedule_end")


def check_config(cfg: ml_collections.ConfigDict | TokenDropper,
                 prefix: str = "config.data.token_drop.") -> None:
  """Checks config.data.token_drop, or the same fields of a TokenDropper.

  `prefix` + field name names a field in the errors ("config.data.token_drop.rate").
  """
  check_choice(f"{prefix}kind", cfg.kind, KINDS)
  for name in _RATES:
    check_range(f"{prefix}{name}", getattr(cfg, name), 0.0, 1.0, high_open=True)
  if cfg.kind == "beta":
    means = (cfg.schedule_start, cfg.schedule_end) if cfg.schedule else (cfg.rate,)
    if not all(0 < m < cfg.max_rate for m in means):
      raise ValueError(f"{prefix}kind = 'beta' needs its mean rate(s) {means} in (0, "
                       f"{prefix}max_rate = {cfg.max_rate})")
  if cfg.kind == "resolution":
    if cfg.schedule:
      raise ValueError(f"{prefix}schedule applies to kind 'constant' or 'beta', not "
                       "'resolution'")
    if not 1 <= cfg.min_tokens < cfg.max_tokens:
      raise ValueError(f"{prefix}kind = 'resolution' needs 1 <= min_tokens "
                       f"({cfg.min_tokens}) < max_tokens ({cfg.max_tokens})")
    check_range(f"{prefix}resolution_std", cfg.resolution_std, 0.0, low_open=True)
  if cfg.schedule:
    check_range(f"{prefix}schedule_images", cfg.schedule_images, 1)


def kept_tokens(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
  """The tokens of an image of `n` that survive dropping a fraction `rate` at random.

  The number kept is n (1 - rate) rounded stochastically (so its mean is exactly
  n (1 - rate)), and at least one. Rate 0 draws nothing.

  Returns:
    int64 [k], the kept indices in increasing order.
  """
  if n < 1:
    raise ValueError(f"token dropping needs an image of n >= 1 tokens, got {n}")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"token drop rate must be in [0, 1), got {rate}")
  if rate == 0.0:
    return np.arange(n)
  target = n * (1.0 - rate)
  keep = max(1, min(n, math.floor(target) + int(rng.random() < target - math.floor(target))))
  return np.sort(rng.choice(n, size=keep, replace=False))


def drop_tokens(rng: np.random.Generator, patches: np.ndarray, positions: np.ndarray,
                rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Drops a fraction `rate` of an image's tokens uniformly at random (`kept_tokens`).

  Args:
    rng: the randomness.
    patches: [n, D] (any dtype), n >= 1.
    positions: [n, 2] int32, aligned with `patches`.
    rate: in [0, 1).

  Returns:
    (patches [k, D], positions [k, 2], kept int64 [k]): the kept tokens and their indices
    into the input, in their original (increasing) order.
  """
  n = patches.shape[0]
  if n < 1 or positions.shape[0] != n:
    raise ValueError(f"drop_tokens needs n >= 1 aligned patches and positions, got "
                     f"{list(patches.shape)} and {list(positions.shape)}")
  kept = kept_tokens(rng, n, rate)
  if rate == 0.0:
    return patches, positions, kept
  return patches[kept], positions[kept], kept


def schedule_value(images_seen: int, start: float, end: float, num_images: int) -> float:
  """Sigmoid from `start` (image 0) to `end` (image `num_images` and after)."""
  x = min(max(images_seen / num_images, 0.0), 1.0)
  sig = lambda t: 1.0 / (1.0 + math.exp(-t))
  half = _SIGMOID_STEEPNESS / 2
  frac = (sig(_SIGMOID_STEEPNESS * x - half) - sig(-half)) / (sig(half) - sig(-half))
  return start + (end - start) * frac


@dataclasses.dataclass(frozen=True)
class TokenDropper:
  """Per-image drop rate and dropping; built from `config.data.token_drop`."""

  kind: str = "none"
  rate: float = 0.5
  max_rate: float = 0.9
  min_rate: float = 0.1
  min_tokens: int = 16
  max_tokens: int = 256
  resolution_std: float = 0.02
  schedule: bool = False
  schedule_start: float = 0.2
  schedule_end: float = 0.8
  schedule_images: int = 1_000_000

  def __post_init__(self):
    check_config(self, prefix="token drop ")

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> TokenDropper:
    """From `config.data.token_drop`."""
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})

  def mean_rate(self, num_tokens: int, images_seen: int = 0) -> float:
    """The expected drop rate of an image of `num_tokens` patches (before clipping)."""
    if self.kind == "none":
      return 0.0
    if self.kind == "resolution":
      frac = (num_tokens - self.min_tokens) / (self.max_tokens - self.min_tokens)
      return self.min_rate + (self.max_rate - self.min_rate) * min(max(frac, 0.0), 1.0)
    if self.schedule:
      return schedule_value(images_seen, self.schedule_start, self.schedule_end,
                            self.schedule_images)
    return self.rate

  def sample_rate(self, rng: np.random.Generator, num_tokens: int,
                  images_seen: int = 0) -> float:
    """Draws the drop rate, in [0, 1), of one image of `num_tokens` patches."""
    mu = self.mean_rate(num_tokens, images_seen)
    if self.kind in ("none", "constant"):
      return mu
    if self.kind == "beta":
      u_mu = mu / self.max_rate
      total = 1.0 / _BETA_VARIANCE - 1.0
      return float(rng.beta(u_mu * total, (1.0 - u_mu) * total)) * self.max_rate
    while True:
      z = rng.normal()
      if abs(z) <= 2.0:
        return min(max(mu + self.resolution_std * z, 0.0), math.nextafter(1.0, 0.0))

  def __call__(self, rng: np.random.Generator, patches: np.ndarray, positions: np.ndarray,
               images_seen: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Drops tokens from one image: (patches [n, D], positions [n, 2]) -> [k, D], [k, 2]."""
    if self.kind == "none":
      return patches, positions
    rate = self.sample_rate(rng, patches.shape[0], images_seen)
    kept_patches, kept_positions, _ = drop_tokens(rng, patches, positions, rate)
    return kept_patches, kept_positions
