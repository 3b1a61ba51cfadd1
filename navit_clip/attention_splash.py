"""Segment-masked attention through the Pallas splash-attention kernel (TPU).

Splash attention takes one example at a time ([H, L, Dh]) with `SegmentIds(q, kv)`, has no
scale argument and tiles the sequence in blocks that are multiples of 128. This module adapts
it to the layout of `navit_clip.attention.attention` ([B, L, H, Dh]): it pre-scales q by
1/sqrt(Dh), vmaps the kernel over the batch and transposes around it. With `interpret=True`
the kernel runs in Pallas interpret mode, which is slow but exact, so it can be tested
against the reference on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

LANES = 128  # splash tiles are multiples of the TPU lane width
_BLOCK_CHOICES = (512, 256, 128)  # largest that divides the length wins


def block_size(length: int, *, what: str = "sequence length") -> int:
  """Largest tile in (512, 256, 128) dividing `length`; ValueError if none does."""
  for block in _BLOCK_CHOICES:
    if length % block == 0:
      return block
  raise ValueError(f"splash attention needs the {what} to be a multiple of {LANES}, got "
                   f"{length}; pad the packed rows to a multiple of {LANES} or use the "
                   "'xla' backend")


def _kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
  bq = block_size(q_len, what="query length")
  bkv = block_size(kv_len, what="key/value length")
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)
  mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(num_heads)])
  return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, *, interpret: bool = False) -> jax.Array:
  """Splash attention restricted to equal segment ids.

  Args:
    q: [B, Lq, H, Dh] queries; k, v: [B, Lk, H, Dh]. Lq and Lk must be multiples of 128.
    q_segment_ids: int32 [B, Lq]; kv_segment_ids: int32 [B, Lk]. Every query must share its id
      with at least one key (true for self-attention, where padding attends to padding).
    interpret: run the kernel in Pallas interpret mode (any platform; for tests on CPU).
  Returns:
    [B, Lq, H, Dh] in q's dtype.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0::2] != k.shape[0::2]:
    raise ValueError(f"splash attention expects q [B, Lq, H, Dh] and k, v [B, Lk, H, Dh]; got "
                     f"q {q.shape}, k {k.shape}, v {v.shape}")
  _, q_len, heads, head_dim = q.shape
  kernel = _kernel(heads, q_len, k.shape[1], interpret)
  out_dtype = q.dtype
  q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(k.dtype)

  def one(q1, k1, v1, qs, ks):  # [L, H, Dh] -> [H, L, Dh] for the kernel and back
    out = kernel(q1.swapaxes(0, 1), k1.swapaxes(0, 1), v1.swapaxes(0, 1),
                 segment_ids=sk.SegmentIds(q=qs, kv=ks))
    return out.swapaxes(0, 1)

  out = jax.vmap(one)(q, k, v, q_segment_ids.astype(jnp.int32),
                      kv_segment_ids.astype(jnp.int32))
  return out.astype(out_dtype)
