"""Resizing an image and cutting it into a row-major sequence of flattened patches."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _check_image(image: np.ndarray) -> None:
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
    dtype = getattr(image, "dtype", type(image).__name__)
    raise ValueError(f"image must be a uint8 np.ndarray [H, W, C], got {dtype}")
  if image.ndim != 3 or min(image.shape) < 1:
    raise ValueError(f"image must have shape [H, W, C] with every dim >= 1, got "
                     f"{list(image.shape)}")


RESAMPLE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize(image: np.ndarray, size_hw: tuple[int, int], resample: str = "bilinear"
           ) -> np.ndarray:
  """Resizes with PIL's bilinear or bicubic filter (antialiased when shrinking).

  Args:
    image: uint8 [H, W, C], any number of channels (three go through PIL at once, others
      one channel at a time).
    size_hw: target (height, width) in pixels, each >= 1.
    resample: a key of RESAMPLE_FILTERS.

  Returns:
    uint8 [height, width, C]; the input itself when it already has that size.
  """
  _check_image(image)
  h, w = int(size_hw[0]), int(size_hw[1])
  if h < 1 or w < 1:
    raise ValueError(f"resize target must be >= 1 pixel a side, got ({h}, {w})")
  if resample not in RESAMPLE_FILTERS:
    raise ValueError(f"resize filter {resample!r}; expected one of {list(RESAMPLE_FILTERS)}")
  if image.shape[:2] == (h, w):
    return image
  pil_filter = RESAMPLE_FILTERS[resample]
  if image.shape[2] == 3:
    return np.asarray(Image.fromarray(image).resize((w, h), pil_filter))
  planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]))
                       .resize((w, h), pil_filter))
            for c in range(image.shape[2])]
  return np.stack(planes, axis=-1)


def patchify(image: np.ndarray, patch_size: int, keep: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts an image whose sides are multiples of the patch size into patches.

  Args:
    image: uint8 [H, W, C], H and W multiples of P = `patch_size`.
    patch_size: P.
    keep: int [k], the row-major grid indices of the patches to keep, increasing (token
      dropping: only they are copied); None keeps all n = (H/P) * (W/P).

  Returns:
    patches: uint8 [k, P*P*C], patches in row-major grid order, each flattened row-major
      over its pixels with the channel fastest (like image[r, c, :]).
    positions: int32 [k, 2], the (row, col) of each patch in the grid.
    grid_hw: int32 [2], the grid's (rows, cols) = (H/P, W/P).
  """
  _check_image(image)
  if patch_size < 1:
    raise ValueError(f"patch_size must be >= 1, got {patch_size}")
  h, w, c = image.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size ({h}, {w}) is not a multiple of patch size {patch_size}; "
                     "resize to a patch-rounded size first")
  gh, gw = h // patch_size, w // patch_size
  if keep is not None and (keep.ndim != 1 or not keep.size or keep.min() < 0
                           or keep.max() >= gh * gw):
    raise ValueError(f"keep must index 1..{gh * gw} of the {gh}x{gw} patch grid, got "
                     f"{keep.size} indices in [{keep.min(initial=0)}, {keep.max(initial=0)}]")
  # Views until one copy: each patch's row of P pixels (P*C contiguous bytes) is taken as
  # one item, so the copy moves whole patch rows (several times faster than byte strides).
  patch_row = np.dtype((np.void, patch_size * c))
  strips = np.ascontiguousarray(image).reshape(gh, patch_size, gw, patch_size * c)
  grid = strips.view(patch_row)[..., 0].transpose(0, 2, 1)  # [gh, gw, P] patch rows
  index = np.arange(gh * gw, dtype=np.int32) if keep is None else keep.astype(np.int32)
  rows, cols = np.divmod(index, np.int32(gw))
  kept = np.ascontiguousarray(grid) if keep is None else grid[rows, cols]
  patches = kept.view(np.uint8).reshape(len(index), patch_size * patch_size * c)
  return patches, np.stack([rows, cols], axis=-1), np.array([gh, gw], np.int32)
