"""Segment-masked attention: the xla reference against a NumPy oracle, splash against xla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from navit_clip import attention_splash
from navit_clip.attention import attention


def _segments(rng: np.random.Generator, batch: int, length: int, max_segments: int):
  """Random packed layouts: runs of ids 1..k (k <= max_segments), then padding (id 0)."""
  out = np.zeros((batch, length), np.int32)
  for b in range(batch):
    n = int(rng.integers(1, max_segments + 1))
    cuts = np.sort(rng.choice(np.arange(1, length), size=n, replace=False))
    ids = np.zeros(length, np.int32)
    start = 0
    for k, end in enumerate(cuts, start=1):  # segment k covers [start, end); rest is padding
      ids[start:end] = k
      start = end
    out[b] = ids
  return jnp.asarray(out)


def _qkv(rng: np.random.Generator, batch: int, length: int, heads: int, dim: int):
  return [jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
          for _ in range(3)]


def _numpy_attention(q, k, v, seg):
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  mask = seg[:, None, :, None] == seg[:, None, None, :]
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_xla_reference_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng, 3, 24, 2, 8)
  seg = _segments(rng, 3, 24, 5)
  got = attention(q, k, v, seg, seg, backend="xla")
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, seg), atol=1e-5, rtol=1e-5)


def test_other_segments_do_not_leak():
  rng = np.random.default_rng(1)
  q, k, v = _qkv(rng, 1, 16, 2, 4)
  seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4], jnp.int32)
  base = attention(q, k, v, seg, seg)
  other = (seg != 1)[..., None, None]
  noisy = attention(q, jnp.where(other, k * 3 + 1, k), jnp.where(other, -v, v), seg, seg)
  np.testing.assert_array_equal(base[:, :5], noisy[:, :5])


@pytest.mark.parametrize("length,max_segments,seed", [(128, 1, 0), (128, 12, 1), (256, 40, 2)])
def test_splash_matches_xla(length, max_segments, seed):
  rng = np.random.default_rng(seed)
  q, k, v = _qkv(rng, 2, length, 2, 8)
  seg = _segments(rng, 2, length, max_segments)
  want = attention(q, k, v, seg, seg, backend="xla")
  got = attention(q, k, v, seg, seg, backend="splash")
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


def test_splash_gradients_match_xla():
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 2, 256, 2, 8)
  seg = _segments(rng, 2, 256, 20)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def loss(backend):
    return lambda q, k, v: (attention(q, k, v, seg, seg, backend=backend) * w).sum()

  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  for g, r, name in zip(got, want, "qkv"):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_splash_bfloat16_close_to_xla():
  rng = np.random.default_rng(4)
  q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(rng, 1, 128, 2, 8))
  seg = _segments(rng, 1, 128, 6)
  got = attention(q, k, v, seg, seg, backend="splash")
  assert got.dtype == jnp.bfloat16
  want = attention(q, k, v, seg, seg, backend="xla")
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=3e-2, rtol=3e-2)


def test_splash_block_size_choice_and_error():
  assert attention_splash.block_size(128) == 128
  assert attention_splash.block_size(384) == 128
  assert attention_splash.block_size(768) == 256
  assert attention_splash.block_size(1024) == 512
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 1, 96, 2, 8)
  seg = jnp.ones((1, 96), jnp.int32)
  with pytest.raises(ValueError, match="multiple of 128, got 96"):
    attention(q, k, v, seg, seg, backend="splash")


def test_unknown_backend_is_named():
  q = jnp.zeros((1, 4, 1, 2))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="'flash'"):
    attention(q, q, q, seg, seg, backend="flash")
