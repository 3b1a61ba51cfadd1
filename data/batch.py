"""The packed-batch contract between the data pipeline and the model.

A packed batch is a dict of fixed-shape NumPy (host) or JAX (device) arrays. B rows,
L patch tokens per row, at most M images per row, T text tokens per caption, K classes:

  patches      uint8  [B, L, P*P*C]  raw pixels; normalised on device
  segment_ids  int32  [B, L]         0 = padding, k = k-th image of the row (1..M)
  positions    int32  [B, L, 2]      (row, col) of the patch in its image's patch grid
  grid_hw      int32  [B, L, 2]      (h, w) of that image's patch grid; (0, 0) on padding
  image_mask   bool   [B, M]         True where slot k (segment k+1) holds an image
  example_id   int64  [B, M]         the source example's id; -1 in empty slots (host only)
  text_tokens  int32  [B, M, T]      one caption per slot (contrastive mode only)
  labels       int32  [B, M] (single-label) or float32 [B, M, K] (multi-hot), classification

Everything downstream (attention mask, pooling, loss masking) derives from `segment_ids`
and `image_mask`. Padding tokens and empty slots never touch the loss or the gradients.
Host-only fields (HOST_ONLY_FIELDS) serve tracing and export and are never sent to devices
(`device_fields`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import TypeVar

import numpy as np

V = TypeVar("V")

# Fields of a packed batch kept on the host: tracing and export read them, devices never do.
HOST_ONLY_FIELDS = ("example_id",)


def device_fields(batch: Mapping[str, V], *, drop: Collection[str] = ()) -> dict[str, V]:
  """The fields of packed batch `batch` that go to devices: all but HOST_ONLY_FIELDS and `drop`.

  Works on any mapping of field name -> value (NumPy or JAX arrays, jax.ShapeDtypeStructs).
  """
  return {k: v for k, v in batch.items() if k not in HOST_ONLY_FIELDS and k not in drop}


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static shape of a packed batch: one compile per spec, never per step."""

  batch_size: int  # B
  seq_len: int  # L
  max_images: int  # M
  patch_size: int  # P
  channels: int = 3  # C
  text_len: int | None = None  # T (contrastive mode)
  num_classes: int | None = None  # K (classification mode)
  multi_label: bool = False  # labels [B, M, K] float32 if True, else [B, M] int32

  def __post_init__(self):
    for name in ("batch_size", "seq_len", "max_images", "patch_size", "channels"):
      if getattr(self, name) < 1:
        raise ValueError(f"BatchSpec.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_images > self.seq_len:
      raise ValueError(
          f"BatchSpec.max_images ({self.max_images}) exceeds seq_len ({self.seq_len}): "
          "every image needs at least one token")

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.channels

  def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Field name -> (shape, dtype) of every array in a batch of this spec."""
    b, l, m = self.batch_size, self.seq_len, self.max_images
    out = {
        "patches": ((b, l, self.patch_dim), np.dtype(np.uint8)),
        "segment_ids": ((b, l), np.dtype(np.int32)),
        "positions": ((b, l, 2), np.dtype(np.int32)),
        "grid_hw": ((b, l, 2), np.dtype(np.int32)),
        "image_mask": ((b, m), np.dtype(np.bool_)),
        "example_id": ((b, m), np.dtype(np.int64)),
    }
    if self.text_len is not None:
      out["text_tokens"] = ((b, m, self.text_len), np.dtype(np.int32))
    if self.num_classes is not None:
      if self.multi_label:
        out["labels"] = ((b, m, self.num_classes), np.dtype(np.float32))
      else:
        out["labels"] = ((b, m), np.dtype(np.int32))
    return out

  def zeros(self) -> dict[str, np.ndarray]:
    """An all-padding batch: no images, example ids -1."""
    out = {k: np.zeros(s, d) for k, (s, d) in self.shapes().items()}
    out["example_id"][:] = -1
    return out
