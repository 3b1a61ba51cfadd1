"""The NaViT image tower: packed patch sequences in, one embedding per image slot out.

uint8 patches [B, L, P*P*C] are normalised on device (x / 127.5 - 1), embedded by a Dense
layer, given a 2-D position embedding (navit_clip.posemb), run through pre-LN blocks whose
attention is masked by segment id (no attention across images, padding apart), and pooled
per image slot (MAP head or masked mean). Slot k of a row holds the image with segment id
k + 1; slots that `image_mask` marks empty come out as zeros, so they carry neither values
nor gradients.
Parameters are float32; `dtype` is the compute dtype (a jnp dtype or its name, see
`navit_clip.layers.compute_dtype`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.typing import DTypeLike

from navit_clip.activation_sharding import constrain_batch
from navit_clip.attention import CHOICES as ATTENTION_CHOICES
from navit_clip.attention import resolve_backend
from navit_clip.choices import check_choice, check_range, naming
from navit_clip.layers import (COMPUTE_DTYPES, REMAT, Encoder, MAPHead, compute_dtype, dense,
                               segment_mean)
from navit_clip.posemb import COORDS as POSEMB_COORDS
from navit_clip.posemb import KINDS as POSEMB_KINDS
from navit_clip.posemb import position_embedding
from navit_clip.variants import Size, parse_variant

POOLS = ("map", "mean")


def _patched_variant(key: str, variant: str) -> tuple[Size, int]:
  """(size, patch size) of an image tower variant such as "B/16"; `key` names it in errors."""
  with naming(key, variant):
    size, patch = parse_variant(variant)
  if patch is None:
    raise ValueError(f"{key} = {variant!r} needs a patch size, e.g. 'B/16'")
  return size, patch


def check_config(image: ml_collections.ConfigDict) -> None:
  """Checks config.model.image, the keys `ImageTower.from_config` reads.

  Raises:
    ValueError: naming the key ("config.model.image.posemb = ...") and what it must be.
  """
  key = "config.model.image"
  _patched_variant(f"{key}.variant", image.variant)
  check_range(f"{key}.channels", image.channels, 1)
  check_choice(f"{key}.posemb", image.posemb, POSEMB_KINDS)
  check_choice(f"{key}.posemb_coords", image.posemb_coords, POSEMB_COORDS)
  check_range(f"{key}.posemb_resolution", image.posemb_resolution, 1)
  check_choice(f"{key}.pool", image.pool, POOLS)
  check_choice(f"{key}.dtype", image.dtype, COMPUTE_DTYPES)
  check_choice(f"{key}.remat", image.remat, REMAT)
  check_choice(f"{key}.attention", image.attention, ATTENTION_CHOICES)


def normalize_patches(patches: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """uint8 pixels [..., P*P*C] -> `dtype` values in [-1, 1]."""
  if patches.dtype != jnp.uint8:
    raise ValueError(f"patches must be uint8 pixels, got {patches.dtype}")
  return patches.astype(dtype) / 127.5 - 1.0


class ImageTower(nnx.Module):
  """NaViT encoder over packed batches (see navit_clip.data.batch for the fields).

  __call__(batch) -> (embeddings float32 [B, M, D], image_mask bool [B, M]); M comes from
  batch["image_mask"]. `tokens` gives the per-token features [B, L, D] before pooling.
  `attention` names the encoder's attention backend (navit_clip.attention.CHOICES); "auto"
  is resolved here, once, for the platform the tower is built on.
  """

  def __init__(self, *, variant: str = "S/16", channels: int = 3, posemb: str = "learned",
               posemb_coords: str = "fractional", posemb_resolution: int = 64,
               qk_norm: bool = True, use_bias: bool = False, pool: str = "map",
               dtype: DTypeLike = jnp.float32, remat: str = "none", scan_layers: bool = False,
               attention: str = "xla", rngs: nnx.Rngs):
    size, patch = _patched_variant("image tower variant", variant)
    check_choice("image pooling", pool, POOLS)
    self.patch_size, self.channels, self.width = patch, channels, size.width
    self.dtype = compute_dtype(dtype)
    self.embedding = dense(patch * patch * channels, size.width, use_bias=use_bias,
                           dtype=self.dtype, rngs=rngs)
    self.posemb = position_embedding(size.width, kind=posemb, coords=posemb_coords,
                                     resolution=posemb_resolution, rngs=rngs)
    self.encoder = Encoder(size.width, size.depth, size.mlp_dim, size.num_heads,
                           qk_norm=qk_norm, use_bias=use_bias, dtype=self.dtype,
                           backend=resolve_backend(attention), scan_layers=scan_layers,
                           remat=remat, rngs=rngs)
    self.head = (MAPHead(size.width, size.mlp_dim, size.num_heads, qk_norm=qk_norm,
                         use_bias=use_bias, dtype=self.dtype, rngs=rngs)
                 if pool == "map" else None)

  @classmethod
  def from_config(cls, image: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> ImageTower:
    """Builds the tower from `config.model.image` (checked by `check_config`)."""
    check_config(image)
    return cls(variant=image.variant, channels=image.channels, posemb=image.posemb,
               posemb_coords=image.posemb_coords, posemb_resolution=image.posemb_resolution,
               qk_norm=image.qk_norm, use_bias=image.use_bias, pool=image.pool,
               dtype=image.dtype, remat=image.remat, scan_layers=image.scan_layers,
               attention=image.attention, rngs=rngs)

  def tokens(self, pixels: jax.Array, segment_ids: jax.Array, positions: jax.Array,
             grid_hw: jax.Array) -> jax.Array:
    """Per-token features after the final LayerNorm.

    Args:
      pixels: float [B, L, P*P*C], already normalised (see `normalize_patches`).
      segment_ids: int32 [B, L]; positions, grid_hw: int32 [B, L, 2].
    Returns:
      [B, L, D] in the compute dtype.
    """
    want = self.patch_size * self.patch_size * self.channels
    if pixels.ndim != 3 or pixels.shape[-1] != want:
      raise ValueError(f"patches must be [B, L, {want}] for patch {self.patch_size} and "
                       f"{self.channels} channels, got {pixels.shape}")
    x = self.embedding(pixels.astype(self.dtype))
    x = constrain_batch(x + self.posemb(positions, grid_hw).astype(self.dtype))
    return constrain_batch(self.encoder(x, segment_ids))

  def pool(self, tokens: jax.Array, segment_ids: jax.Array,
           image_mask: jax.Array) -> jax.Array:
    """[B, L, D] tokens -> float32 [B, M, D], zero in slots where image_mask is False."""
    max_images = image_mask.shape[-1]
    if self.head is not None:
      pooled = self.head(tokens, segment_ids, max_images).astype(jnp.float32)
    else:
      pooled = segment_mean(tokens, segment_ids, max_images)
    return jnp.where(image_mask[..., None], pooled, 0.0)

  def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Embeds a packed batch.

    Args:
      batch: needs patches uint8 [B, L, P*P*C], segment_ids int32 [B, L], positions and
        grid_hw int32 [B, L, 2], image_mask bool [B, M]; other fields are ignored.
    Returns:
      (embeddings float32 [B, M, D], image_mask bool [B, M]).
    """
    missing = [k for k in ("patches", "segment_ids", "positions", "grid_hw", "image_mask")
               if k not in batch]
    if missing:
      raise ValueError(f"image tower input is missing fields {missing}")
    segment_ids, image_mask = batch["segment_ids"], batch["image_mask"].astype(bool)
    pixels = normalize_patches(batch["patches"], self.dtype)
    tokens = self.tokens(pixels, segment_ids, batch["positions"], batch["grid_hw"])
    return self.pool(tokens, segment_ids, image_mask), image_mask
