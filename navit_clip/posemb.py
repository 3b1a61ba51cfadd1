"""2-D position embeddings for packed patch sequences: factorized (NaViT section 2.1) or resized.

The embedding of the patch at (y, x) of an h x w patch grid is phi_y(y) + phi_x(x). The
coordinates are either fractional, r = p / side in [0, 1) (the default: two images of the same
content at different sizes get the same embedding at the same relative place, and the
embedding does not reveal the aspect ratio), or absolute patch indices.

Kinds:
  learned  two tables [resolution, D]. Fractional coordinates are bucketed as
           floor(r * resolution) (exact integer arithmetic); absolute indices are clipped to
           resolution - 1.
  sincos   fixed transformer sinusoids of t = r * resolution (fractional) or t = p (absolute).
           phi_y fills the first D/2 channels and phi_x the last D/2, so that swapping y and x
           changes the embedding (one shared sinusoid added twice would be symmetric).
  fourier  Gaussian random Fourier features (Tancik et al. 2020, the learned variant of NeRF's
           positional encoding): t in [0, 1) (r, or p / resolution for absolute coordinates),
           phi_a(t) = [cos(2 pi f_a t), sin(2 pi f_a t)] with a separate trainable frequency
           vector f_a [D/2] per axis, initialised from N(0, (resolution / 4)^2) so that
           neighbouring buckets are told apart. Distinct frequencies per axis break the x <-> y
           symmetry.

Not factorized:
  learned_2d  one learned table [resolution, resolution, D] resized to each image's (h, w)
           grid as F.interpolate(mode="bilinear", align_corners=False, antialias=True) would
           resize it (a triangle filter widened by the scale when shrinking), one token at a
           time, so images with different grids share a packed row. SigLIP 2 NaFlex; with a
           grid equal to the table it is the fixed-resolution ViT's learned table itself.
           It is fractional by construction (`coords` must be "fractional").

Padding tokens carry grid (0, 0); the division is guarded so they embed finitely.
`position_embedding` builds the module of any kind.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from navit_clip.choices import check_choice, check_range

FACTORIZED_KINDS = ("learned", "sincos", "fourier")
KINDS = (*FACTORIZED_KINDS, "learned_2d")
COORDS = ("fractional", "absolute")


def _sincos(t: jax.Array, dim: int) -> jax.Array:
  """float32 [...] -> [..., dim]: [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2))."""
  omega = 1.0 / 10000.0 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
  angle = t[..., None] * omega
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class FactorizedPosEmb(nnx.Module):
  """phi_y(y) + phi_x(x). int32 positions [B, L, 2], grid_hw [B, L, 2] -> float32 [B, L, D]."""

  def __init__(self, width: int, *, kind: str = "learned", coords: str = "fractional",
               resolution: int = 64, rngs: nnx.Rngs):
    check_choice("factorized position embedding kind", kind, FACTORIZED_KINDS)
    check_choice("position coordinates", coords, COORDS)
    check_range("position embedding resolution", resolution, 1)
    if kind != "learned" and width % 4:
      raise ValueError(f"{kind} position embedding needs width divisible by 4, got {width}")
    self.width, self.kind, self.coords, self.resolution = width, kind, coords, resolution
    if kind == "learned":
      init = nnx.initializers.normal(0.02)
      self.table_y = nnx.Param(init(rngs.params(), (resolution, width), jnp.float32))
      self.table_x = nnx.Param(init(rngs.params(), (resolution, width), jnp.float32))
    elif kind == "fourier":
      init = nnx.initializers.normal(resolution / 4)
      self.freq_y = nnx.Param(init(rngs.params(), (width // 2,), jnp.float32))
      self.freq_x = nnx.Param(init(rngs.params(), (width // 2,), jnp.float32))

  def buckets(self, positions: jax.Array, grid_hw: jax.Array) -> jax.Array:
    """int32 [..., 2] table rows of the learned kind, in [0, resolution)."""
    positions = positions.astype(jnp.int32)
    if self.coords == "fractional":
      side = jnp.maximum(grid_hw.astype(jnp.int32), 1)
      idx = positions * self.resolution // side
    else:
      idx = positions
    return jnp.clip(idx, 0, self.resolution - 1)

  def coordinates(self, positions: jax.Array, grid_hw: jax.Array) -> jax.Array:
    """float32 [..., 2]: r = p / side (fractional) or p (absolute)."""
    p = positions.astype(jnp.float32)
    if self.coords == "fractional":
      return p / jnp.maximum(grid_hw.astype(jnp.float32), 1.0)
    return p

  def __call__(self, positions: jax.Array, grid_hw: jax.Array) -> jax.Array:
    if positions.shape[-1] != 2 or positions.shape != grid_hw.shape:
      raise ValueError(f"positions and grid_hw must both be [..., 2]; got {positions.shape} "
                       f"and {grid_hw.shape}")
    if self.kind == "learned":
      idx = self.buckets(positions, grid_hw)
      return (jnp.take(self.table_y[...], idx[..., 0], axis=0)
              + jnp.take(self.table_x[...], idx[..., 1], axis=0))
    t = self.coordinates(positions, grid_hw)
    if self.kind == "sincos":
      if self.coords == "fractional":
        t = t * self.resolution
      half = self.width // 2
      return jnp.concatenate([_sincos(t[..., 0], half), _sincos(t[..., 1], half)], axis=-1)
    if self.coords == "absolute":
      t = t / self.resolution
    ty = 2 * math.pi * t[..., 0:1] * self.freq_y[...]
    tx = 2 * math.pi * t[..., 1:2] * self.freq_x[...]
    return (jnp.concatenate([jnp.cos(ty), jnp.sin(ty)], axis=-1)
            + jnp.concatenate([jnp.cos(tx), jnp.sin(tx)], axis=-1))


def resize_weights(index: jax.Array, size: jax.Array, table_size: int) -> jax.Array:
  """Weights of the table rows for output row `index` of a table resized to `size` rows.

  The weights of F.interpolate(mode="bilinear", align_corners=False, antialias=True) along
  one axis: a triangle filter over the source rows, widened to the scale when shrinking,
  normalised to sum 1.

  Args:
    index: int [...], output rows in [0, size).
    size: int [...], the resized length (0 on padding is treated as 1).
    table_size: S, the table's length.
  Returns:
    float32 [..., S].
  """
  size = jnp.maximum(size.astype(jnp.float32), 1.0)[..., None]
  scale = table_size / size
  center = (index.astype(jnp.float32)[..., None] + 0.5) * scale - 0.5
  source = jnp.arange(table_size, dtype=jnp.float32)
  weights = jnp.maximum(1.0 - jnp.abs(source - center) / jnp.maximum(scale, 1.0), 0.0)
  return weights / weights.sum(-1, keepdims=True)


class ResizedPosEmb(nnx.Module):
  """A learned [S, S, D] table resized to each token's grid (the learned_2d kind).

  int32 positions [B, L, 2], grid_hw [B, L, 2] -> float32 [B, L, D]: the token at (y, x) of
  an h x w grid gets sum_ij wy_i wx_j table[i, j] with wy = resize_weights(y, h, S),
  wx = resize_weights(x, w, S).
  """

  def __init__(self, width: int, *, resolution: int = 16, rngs: nnx.Rngs):
    check_range("position embedding resolution", resolution, 1)
    self.width, self.resolution = width, resolution
    self.table = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (resolution, resolution, width), jnp.float32))

  def __call__(self, positions: jax.Array, grid_hw: jax.Array) -> jax.Array:
    if positions.shape[-1] != 2 or positions.shape != grid_hw.shape:
      raise ValueError(f"positions and grid_hw must both be [..., 2]; got {positions.shape} "
                       f"and {grid_hw.shape}")
    s = self.resolution
    wy = resize_weights(positions[..., 0], grid_hw[..., 0], s)
    wx = resize_weights(positions[..., 1], grid_hw[..., 1], s)
    weights = (wy[..., :, None] * wx[..., None, :]).reshape(*wy.shape[:-1], s * s)
    return jnp.einsum("...k,kd->...d", weights, self.table[...].reshape(s * s, self.width),
                      precision=jax.lax.Precision.HIGHEST)


def position_embedding(width: int, *, kind: str = "learned", coords: str = "fractional",
                       resolution: int = 64, rngs: nnx.Rngs) -> FactorizedPosEmb | ResizedPosEmb:
  """The position embedding of `kind` (one of KINDS); see the module docstring."""
  check_choice("position embedding kind", kind, KINDS)
  if kind != "learned_2d":
    return FactorizedPosEmb(width, kind=kind, coords=coords, resolution=resolution, rngs=rngs)
  check_choice("position coordinates of the learned_2d kind", coords, ("fractional",))
  return ResizedPosEmb(width, resolution=resolution, rngs=rngs)
