"""Segment-masked multi-head attention: one function, several backends.

A token attends to exactly the tokens that share its segment id. Padding tokens (id 0)
attend among themselves, so no softmax row is ever fully masked (no NaN) and padding never
mixes with an image. With `causal=True` a query at position i also sees only keys at
positions j <= i (text towers). Every backend is tested equal to the "xla" reference.

Backends:
  xla     jax.nn.dot_product_attention with a boolean [B, 1, Lq, Lk] mask (reference; any device)
  splash  Pallas splash attention with SegmentIds (TPU; interpret mode elsewhere, for tests)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "splash")


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, *,
                 causal: bool = False) -> jax.Array:
  """bool [B, 1, Lq, Lk]: True where query and key share a segment id.

  With `causal`, also False where the key position j is after the query position i (j > i).
  """
  mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  if causal:
    mask &= jnp.tril(jnp.ones((q_segment_ids.shape[-1], kv_segment_ids.shape[-1]), jnp.bool_))
  return mask


def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal):
  mask = segment_mask(q_segment_ids, kv_segment_ids, causal=causal)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, *, backend: str = "xla",
              causal: bool = False) -> jax.Array:
  """Scaled dot-product attention restricted to equal segment ids.

  Args:
    q: [B, Lq, H, Dh] queries; k, v: [B, Lk, H, Dh]. Any float dtype; softmax runs in f32.
    q_segment_ids: int32 [B, Lq]; kv_segment_ids: int32 [B, Lk]. 0 marks padding.
    backend: one of BACKENDS.
    causal: also mask keys after the query position (self-attention; "xla" backend only).
  Returns:
    [B, Lq, H, Dh] in q's dtype.
  """
  if backend == "xla":
    return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)
  if causal:
    raise ValueError(f"causal attention is implemented by the 'xla' backend only, not "
                     f"{backend!r}")
  if backend == "splash":
    from navit_clip import attention_splash  # Pallas import only when asked for
    return attention_splash.splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
  raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
