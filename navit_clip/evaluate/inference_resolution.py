"""Inference resolution policies: how large each image is when it is embedded.

  budget:N   the largest size, aspect kept, with at most N patches (e.g. "budget:256")
  side:S     area S*S pixels, aspect kept (S is the geometric mean of height and width)
  native     the image's own size rounded to patches, shrunk only to fit a row
  naflex:N   SigLIP 2 NaFlex's image processor: aspect kept, each side rounded up to whole
             patches, at most N patches (`naflex_size`); bilinear, decoded at full size
  square:S   SigLIP's image processor: squashed to S x S with the bicubic filter, decoded at
             full size; a side that is not a multiple of the patch loses its last rows and
             columns, as the processor's strided convolution ignores them

Every policy is deterministic and maps onto a sampler of target sizes (a
`ResolutionSampler`, or `NaflexSampler` / `SquareSampler` here), a resize filter and a
decode mode. The packed rows of an inference batch must hold the largest image a policy
can produce, so the policy also sets the default row length (`inference_spec`).
An imported checkpoint records its processor's policy in `config.inference_resolution`.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from navit_clip.choices import naming
from navit_clip.data.batch import BatchSpec
from navit_clip.data.pipeline import batch_spec
from navit_clip.data.resolution_sampling import ResolutionSampler, naflex_size

KINDS = ("budget", "side", "native", "naflex", "square")
PROCESSOR_KINDS = ("naflex", "square")  # reproduce an image processor: full decode


def check_config(policy: str, key: str = "config.inference_resolution") -> None:
  """Raises ValueError "KEY = 'x': ..." unless `policy` parses as a policy."""
  with naming(key, policy):
    ResolutionPolicy.parse(policy)


@dataclasses.dataclass(frozen=True)
class NaflexSampler:
  """The sizes of policy naflex:N: `naflex_size` at min(N, max_patches) patches."""

  patch_size: int
  max_patches: int
  budget: int

  def sample(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, bool]:
    """(height, width, shrunk) of an (h, w) image; `rng` is not used."""
    del rng
    height, width = naflex_size(h, w, self.patch_size, min(self.budget, self.max_patches))
    if self.budget <= self.max_patches:
      return height, width, False
    wanted = naflex_size(h, w, self.patch_size, self.budget)
    return height, width, wanted != (height, width)


@dataclasses.dataclass(frozen=True)
class SquareSampler:
  """The size of policy square:S: (S, S) for every image."""

  patch_size: int
  max_patches: int
  side: int

  def __post_init__(self):
    grid = self.side // self.patch_size
    if grid < 1 or grid * grid > self.max_patches:
      raise ValueError(f"resolution policy square:{self.side} gives {grid} x {grid} patches "
                       f"of {self.patch_size} px; rows of {self.max_patches} tokens need "
                       f"1 to {self.max_patches} of them")

  def sample(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, bool]:
    """(S, S, False) whatever the image's (h, w); `rng` is not used."""
    del rng, h, w
    return self.side, self.side, False


@dataclasses.dataclass(frozen=True)
class ResolutionPolicy:
  """One of KINDS; `value` is the patch budget or the side in pixels (0 for native)."""

  kind: str
  value: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"resolution policy kind {self.kind!r}; expected one of {list(KINDS)}")
    if self.kind != "native" and self.value < 1:
      raise ValueError(f"resolution policy {self.kind}:{self.value} needs a value >= 1")

  @classmethod
  def parse(cls, text: str | int) -> ResolutionPolicy:
    """"budget:256", "256" (a budget), "side:224", "native", "naflex:256" or "square:224"."""
    text = str(text).strip()
    if text == "native":
      return cls("native")
    kind, sep, value = text.partition(":")
    if not sep:
      kind, value = "budget", text
    try:
      return cls(kind, int(value))
    except ValueError:
      raise ValueError(f"resolution policy {text!r}: expected 'budget:N', 'N', 'side:S', "
                       "'native', 'naflex:N' or 'square:S'") from None

  def __str__(self) -> str:
    return "native" if self.kind == "native" else f"{self.kind}:{self.value}"

  def min_seq_len(self, patch_size: int) -> int:
    """The fewest tokens a row needs so that no image of this policy is shrunk to fit.

    Native images can be of any size; they are shrunk to the row (0 here).
    """
    if self.kind in ("budget", "naflex"):
      return self.value
    if self.kind == "square":
      return (self.value // patch_size) ** 2
    if self.kind == "side":
      # Rounding each side to the nearest patch adds at most half a patch per side.
      return math.ceil(self.value / patch_size + 1) ** 2
    return 0

  @property
  def resample(self) -> str:
    """The resize filter of `navit_clip.data.patchify.resize`: bicubic for square:S."""
    return "bicubic" if self.kind == "square" else "bilinear"

  @property
  def draft(self) -> bool:
    """Whether JPEGs may be decoded at reduced scale; never for an image processor's
    policy, which decodes at full size before resizing."""
    return self.kind not in PROCESSOR_KINDS

  def sampler(self, patch_size: int, seq_len: int, max_upscale: float
              ) -> ResolutionSampler | NaflexSampler | SquareSampler:
    """The sampler of this policy for rows of `seq_len` tokens (naflex and square ignore
    `max_upscale`, as their processors do)."""
    if self.kind == "naflex":
      return NaflexSampler(patch_size=patch_size, max_patches=seq_len, budget=self.value)
    if self.kind == "square":
      return SquareSampler(patch_size=patch_size, max_patches=seq_len, side=self.value)
    if self.kind == "budget":
      return ResolutionSampler(kind="patch_budget", patch_size=patch_size, max_patches=seq_len,
                               patch_budget=self.value, max_upscale=max_upscale)
    if self.kind == "side":
      return ResolutionSampler(kind="fixed_area", patch_size=patch_size, max_patches=seq_len,
                               area=float(self.value * self.value), max_upscale=max_upscale)
    return ResolutionSampler(kind="patch_budget", patch_size=patch_size, max_patches=seq_len,
                             patch_budget=seq_len, max_upscale=1.0)


def inference_spec(config: ml_collections.ConfigDict, policy: ResolutionPolicy, *,
                   batch_size: int = 0, seq_len: int = 0, max_images: int = 0,
                   num_classes: int | None = None) -> BatchSpec:
  """The packed-batch shape to embed images of `config`'s model under `policy`.

  Zeros take defaults: B and M from config.data; L = max(config.data.seq_len, the policy's
  `min_seq_len`). No text tokens: images and texts are embedded separately.
  """
  train = batch_spec(config)
  seq_len = seq_len or max(train.seq_len, policy.min_seq_len(train.patch_size))
  return BatchSpec(batch_size=batch_size or train.batch_size, seq_len=seq_len,
                   max_images=min(max_images or train.max_images, seq_len),
                   patch_size=train.patch_size, channels=train.channels,
                   num_classes=num_classes)
