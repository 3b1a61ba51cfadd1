"""Per-example work: one source record -> one packable example.

Runs in Grain worker processes (so it is picklable and import-safe). For record i of the
stream, with randomness drawn from (seed, i) only, so the result does not depend on worker
count or order:

  image uint8 [H, W, C] --resolution sampling (aspect kept, patch-rounded, fits L)-->
  resize --> patchify uint8 [n, P*P*C], positions int32 [n, 2], grid_hw int32 [2]
  --> token dropping (rate per image) --> caption tokens int32 [T] / labels
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from navit_clip.data.patchify import patchify, resize
from navit_clip.data.resolution import ResolutionSampler
from navit_clip.data.token_drop import TokenDropper, drop_tokens
from navit_clip.text.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """Turns a record {"image", "example_id", "caption"?, label fields?} into an example.

  Args:
    patch_size: P.
    sampler: target size per image (its max_patches is the sequence length L).
    dropper: token drop rate per image.
    seed: the stream's seed; record i draws from np.random.default_rng((seed, i)).
    tokenizer: encodes "caption" into "text_tokens" [T] (contrastive mode), or None.
    label_field: record field copied to "labels" (classification mode), or None.
    num_classes / multi_label: labels become int32 scalars, or float32 multi-hot [K] when
      `multi_label` (the record then holds a list of class indices).
  """

  patch_size: int
  sampler: ResolutionSampler
  dropper: TokenDropper
  seed: int
  tokenizer: Tokenizer | None = None
  label_field: str | None = None
  num_classes: int = 0
  multi_label: bool = False

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
    """Record number `index` of the stream -> packable example (see module docstring)."""
    rng = np.random.default_rng((self.seed, index))
    image = record["image"]
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
      raise ValueError(f"record {record.get('example_id', index)}: 'image' must be a "
                       f"decoded uint8 [H, W, C] array, got {type(image).__name__}")
    h, w = self.sampler(rng, image.shape[0], image.shape[1])
    patches, positions, grid_hw = patchify(resize(image, (h, w)), self.patch_size)
    rate = self.dropper.sample_rate(rng, patches.shape[0], images_seen=index)
    patches, positions, _ = drop_tokens(rng, patches, positions, rate)
    out = {"patches": patches, "positions": positions, "grid_hw": grid_hw,
           "example_id": np.int64(record["example_id"])}
    if self.tokenizer is not None:
      out["text_tokens"] = self.tokenizer.encode([record["caption"]])[0]
    if self.label_field is not None:
      out["labels"] = self._labels(record[self.label_field])
    return out

  def _labels(self, value) -> np.ndarray:
    if not self.multi_label:
      label = int(value)
      if not 0 <= label < self.num_classes:
        raise ValueError(f"label {label} is outside [0, num_classes={self.num_classes})")
      return np.int32(label)
    multi_hot = np.zeros((self.num_classes,), np.float32)
    multi_hot[np.asarray(value, np.int64).reshape(-1)] = 1.0
    return multi_hot
