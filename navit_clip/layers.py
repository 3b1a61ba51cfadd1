"""Transformer pieces shared by the image and text towers (Flax NNX).

Pre-LN encoder blocks with optional QK-normalisation and bias removal (ViT-22B), a stack of
them (optionally scanned and rematerialised), and a multi-head attention-pooling (MAP) head
that pools each segment separately, and the masked mean over segments. Parameters are
float32; `dtype` is the compute dtype, a jnp.dtype that `compute_dtype` checked (the towers
call it once on the dtype-like they are given, e.g. a config string).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from navit_clip.attention import attention
from navit_clip.choices import check_choice

COMPUTE_DTYPES = ("float32", "bfloat16")
_kernel_init = nnx.initializers.xavier_uniform()


def compute_dtype(dtype: DTypeLike) -> jnp.dtype:
  """`dtype` (jnp.bfloat16, "bfloat16", ...) as a jnp.dtype; one of COMPUTE_DTYPES."""
  out = jnp.dtype(dtype)
  check_choice("compute dtype", out.name, COMPUTE_DTYPES)
  return out


def segment_mean(x: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Mean of each segment's tokens, summed in float32.

  Args:
    x: tokens [B, L, D], any float dtype.
    segment_ids: int32 [B, L]; 0 is padding, k in 1..num_segments the k-th segment.
    num_segments: S, the slots of the output.
  Returns:
    float32 [B, S, D]: slot k averages the tokens with segment id k + 1; an empty slot
    gives zeros.
  """
  onehot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.float32)  # id 0 -> zeros
  sums = jnp.einsum("bls,bld->bsd", onehot, x.astype(jnp.float32))
  counts = onehot.sum(axis=1)[..., None]
  return sums / jnp.maximum(counts, 1.0)


def dense(din: int, dout: int, *, use_bias: bool, dtype: jnp.dtype,
          rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=_kernel_init, rngs=rngs)


def layer_norm(dim: int, *, use_bias: bool, dtype: jnp.dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                       rngs=rngs)


class MultiHeadAttention(nnx.Module):
  """Segment-masked multi-head attention with optional QK-norm.

  q from `x` [B, Lq, D]; k, v from `kv` [B, Lk, D] (self-attention when kv is None).
  `causal` also hides keys after each query's position (see navit_clip.attention).
  """

  def __init__(self, width: int, num_heads: int, *, qk_norm: bool, use_bias: bool,
               dtype: jnp.dtype, backend: str, rngs: nnx.Rngs, causal: bool = False):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim, self.backend = num_heads, width // num_heads, backend
    self.causal = causal
    self.query = dense(width, width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.key = dense(width, width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.value = dense(width, width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.out = dense(width, width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    if qk_norm:
      self.query_norm = layer_norm(self.head_dim, use_bias=use_bias, dtype=dtype, rngs=rngs)
      self.key_norm = layer_norm(self.head_dim, use_bias=use_bias, dtype=dtype, rngs=rngs)
    else:
      self.query_norm = self.key_norm = None

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def __call__(self, x: jax.Array, segment_ids: jax.Array, kv: jax.Array | None = None,
               kv_segment_ids: jax.Array | None = None) -> jax.Array:
    if kv is None:
      kv, kv_segment_ids = x, segment_ids
    q, k, v = self._heads(self.query(x)), self._heads(self.key(kv)), self._heads(self.value(kv))
    if self.query_norm is not None:
      q, k = self.query_norm(q), self.key_norm(k)
    y = attention(q, k, v, segment_ids, kv_segment_ids, backend=self.backend,
                  causal=self.causal)
    return self.out(y.reshape(*y.shape[:-2], -1))


class Mlp(nnx.Module):
  """Dense -> GELU -> Dense. [..., D] -> [..., D]."""

  def __init__(self, width: int, mlp_dim: int, *, use_bias: bool, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.fc1 = dense(width, mlp_dim, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.fc2 = dense(mlp_dim, width, use_bias=use_bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class EncoderBlock(nnx.Module):
  """Pre-LN block: x + Attn(LN(x)), then + MLP(LN(x)). [B, L, D] -> [B, L, D]."""

  def __init__(self, width: int, mlp_dim: int, num_heads: int, *, qk_norm: bool,
               use_bias: bool, dtype: jnp.dtype, backend: str, rngs: nnx.Rngs,
               causal: bool = False):
    self.norm1 = layer_norm(width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.attn = MultiHeadAttention(width, num_heads, qk_norm=qk_norm, use_bias=use_bias,
                                   dtype=dtype, backend=backend, rngs=rngs, causal=causal)
    self.norm2 = layer_norm(width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp_dim, use_bias=use_bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), segment_ids)
    return x + self.mlp(self.norm2(x))


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep Dense outputs
}
REMAT = ("none", *REMAT_POLICIES)  # the choices of Encoder's `remat`


def _apply_block(block: EncoderBlock, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
  return block(x, segment_ids)


class Encoder(nnx.Module):
  """`depth` pre-LN EncoderBlocks then a final LayerNorm. [B, L, D] -> [B, L, D].

  scan_layers: stack the blocks' parameters along a leading [depth] axis (created with
    nnx.vmap) and apply them with nnx.scan: one block is compiled instead of `depth`.
  remat: "none", "full" (recompute each block in the backward pass) or "dots" (recompute it
    but keep the outputs of the matmuls without batch dimensions, i.e. the Dense layers).
  causal: each token attends only to tokens at or before its position (text towers).
  """

  def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, *, qk_norm: bool,
               use_bias: bool, dtype: jnp.dtype, backend: str, scan_layers: bool = False,
               remat: str = "none", causal: bool = False, rngs: nnx.Rngs):
    if depth < 1:
      raise ValueError(f"encoder depth must be >= 1, got {depth}")
    check_choice("encoder remat", remat, REMAT)

    def make_block(rngs: nnx.Rngs) -> EncoderBlock:
      return EncoderBlock(width, mlp_dim, num_heads, qk_norm=qk_norm, use_bias=use_bias,
                          dtype=dtype, backend=backend, rngs=rngs, causal=causal)

    if scan_layers:
      make_stack = nnx.split_rngs(splits=depth)(nnx.vmap(make_block, in_axes=0, out_axes=0))
      self.blocks = make_stack(rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
    self.norm = layer_norm(width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.scan_layers, self.remat = scan_layers, remat

  def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    apply = _apply_block
    if self.remat != "none":
      apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
    if self.scan_layers:
      x = nnx.scan(apply, in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)(
          self.blocks, x, segment_ids)
    else:
      for block in self.blocks:
        x = apply(block, x, segment_ids)
    return self.norm(x)


class MAPHead(nnx.Module):
  """Multi-head attention pooling, one learned probe per segment.

  Slot k of a row pools the tokens whose segment id is k + 1, then LN + MLP (residual).
  [B, L, D] tokens, int32 [B, L] segment ids -> [B, M, D]. A slot with no tokens attends to
  nothing real (finite, not NaN); callers mask it with the slot mask.
  """

  def __init__(self, width: int, mlp_dim: int, num_heads: int, *, qk_norm: bool,
               use_bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.probe = nnx.Param(_kernel_init(rngs.params(), (1, width), jnp.float32))
    self.attn = MultiHeadAttention(width, num_heads, qk_norm=qk_norm, use_bias=use_bias,
                                   dtype=dtype, backend="xla", rngs=rngs)
    self.norm = layer_norm(width, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp_dim, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array, segment_ids: jax.Array, max_segments: int) -> jax.Array:
    b = x.shape[0]
    probes = jnp.broadcast_to(self.probe[...].astype(self.dtype),
                              (b, max_segments, x.shape[-1]))
    probe_ids = jnp.broadcast_to(jnp.arange(1, max_segments + 1, dtype=jnp.int32),
                                 (b, max_segments))
    y = self.attn(probes, probe_ids, kv=x, kv_segment_ids=segment_ids)
    return y + self.mlp(self.norm(y))
