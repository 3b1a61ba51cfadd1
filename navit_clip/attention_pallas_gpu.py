"""Segment-masked attention through the Pallas-Triton flash-attention kernel (GPU).

`jax.experimental.pallas.ops.gpu.attention.mha` takes the layout of
`navit_clip.attention.attention` ([B, L, H, Dh]) and one int32 [B, L] segment-id array that
serves both queries and keys, so this backend does self-attention only: q, k and v have the
same length and the caller passes the same segment-id array twice. The kernel tiles the
sequence in blocks of 128 (forward) and 32 (backward), so L must be a multiple of 128. It
never materialises the [L, L] mask. On GPU, f32 inputs multiply in TF32 (Triton's default);
bf16 and fp16 inputs multiply natively, softmax statistics are f32 either way. With
`interpret=True` the kernel runs in Pallas interpret mode, which is slow but exact, so it can
be tested against the reference on CPU.

JAX marks this module deprecated in favour of the separate `tokamax` package; the
DeprecationWarning it emits on import is silenced here, and the kernel is tested against the
"xla" reference like every backend.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)
  from jax.experimental.pallas.ops.gpu import attention as triton_attention

BLOCK = 128  # the kernel's forward tile along the sequence (BlockSizes.get_default())


def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                         kv_segment_ids: jax.Array, *, causal: bool = False,
                         interpret: bool = False) -> jax.Array:
  """Flash attention restricted to equal segment ids (self-attention).

  Args:
    q, k, v: [B, L, H, Dh], one float dtype; L a multiple of 128.
    q_segment_ids, kv_segment_ids: int32 [B, L], the same array (self-attention).
    causal: also mask keys after the query position.
    interpret: run the kernel in Pallas interpret mode (any platform; for tests on CPU).
  Returns:
    [B, L, H, Dh] in q's dtype.
  """
  if q.ndim != 4 or not q.shape == k.shape == v.shape:
    raise ValueError(f"the 'pallas_gpu' attention backend does self-attention only: q, k and "
                     f"v must all be [B, L, H, Dh]; got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  if kv_segment_ids is not q_segment_ids:
    raise ValueError("the 'pallas_gpu' attention backend takes one segment-id array for "
                     "queries and keys (self-attention): pass the same array as "
                     "q_segment_ids and kv_segment_ids, or use another backend")
  length, head_dim = q.shape[1], q.shape[-1]
  if length % BLOCK:
    raise ValueError(f"the 'pallas_gpu' attention backend needs the sequence length to be a "
                     f"multiple of {BLOCK}, got {length}; pad the packed rows to a multiple "
                     f"of {BLOCK} or use the 'xla' or 'cudnn' backend")
  return triton_attention.mha(q, k, v, q_segment_ids.astype(jnp.int32),
                              sm_scale=head_dim ** -0.5, causal=causal, interpret=interpret)
