"""Inference resolution policies: how large each image is when it is embedded.

  budget:N   the largest size, aspect kept, with at most N patches (e.g. "budget:256")
  side:S     area S*S pixels, aspect kept (S is the geometric mean of height and width)
  native     the image's own size rounded to patches, shrunk only to fit a row

Every policy is deterministic and maps onto a `ResolutionSampler`. The packed rows of an
inference batch must hold the largest image a policy can produce, so the policy also sets
the default row length (`inference_spec`).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from navit_clip.data.batch import BatchSpec
from navit_clip.data.pipeline import batch_spec
from navit_clip.data.resolution_sampling import ResolutionSampler

KINDS = ("budget", "side", "native")


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
    """"budget:256", "256" (a budget), "side:224" or "native"."""
    text = str(text).strip()
    if text == "native":
      return cls("native")
    kind, sep, value = text.partition(":")
    if not sep:
      kind, value = "budget", text
    try:
      return cls(kind, int(value))
    except ValueError:
      raise ValueError(f"resolution policy {text!r}: expected 'budget:N', 'N', 'side:S' or "
                       "'native'") from None

  def __str__(self) -> str:
    return "native" if self.kind == "native" else f"{self.kind}:{self.value}"

  def min_seq_len(self, patch_size: int) -> int:
    """The fewest tokens a row needs so that no image of this policy is shrunk to fit.

    Native images can be of any size; they are shrunk to the row (0 here).
    """
    if self.kind == "budget":
      return self.value
    if self.kind == "side":
      # Rounding each side to the nearest patch adds at most half a patch per side.
      return math.ceil(self.value / patch_size + 1) ** 2
    return 0

  def sampler(self, patch_size: int, seq_len: int, max_upscale: float) -> ResolutionSampler:
    """The ResolutionSampler of this policy for rows of `seq_len` tokens."""
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
