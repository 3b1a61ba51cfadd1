"""The "blocked" attention backend: equal to xla in values and gradients, and it skips the
blocks where no query and key share a segment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from navit_clip.attention import attention
from navit_clip.attention_blocked import block_pairs, blocked_attention
from navit_clip.image_tower import ImageTower
from test_attention import _max_error, _packed_layouts, _qkv, _reference_and_power, _segments

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _layout(name: str, length: int):
  if name == "packed":
    return _packed_layouts(length)
  return _segments(np.random.default_rng(11), 3, length, 8)


@pytest.mark.parametrize("layout", ["packed", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,block", [(256, 32), (256, 64), (200, 64)])  # 200: padded
def test_blocked_matches_xla(layout, causal, length, block):
  seg = _layout(layout, length)
  q, k, v = _qkv(np.random.default_rng(5), seg.shape[0], length, 2, 16)
  want = _reference_and_power(q, k, v, seg, causal, TOL[jnp.float32])
  got = blocked_attention(q, k, v, seg, seg, causal=causal, block=block)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert _max_error(got, want) <= TOL[jnp.float32]


def test_blocked_backend_in_bfloat16_matches_xla():
  seg = _packed_layouts(256)
  q, k, v = _qkv(np.random.default_rng(6), seg.shape[0], 256, 2, 16, jnp.bfloat16)
  want = attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg, seg, backend="xla")
  got = attention(q, k, v, seg, seg, backend="blocked")
  assert got.dtype == jnp.bfloat16
  assert _max_error(got, want) <= TOL[jnp.bfloat16]


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_gradients_match_xla(causal):
  rng = np.random.default_rng(3)
  seg = _packed_layouts(128)
  q, k, v = _qkv(rng, seg.shape[0], 128, 2, 16)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  _reference_and_power(q, k, v, seg, causal, TOL[jnp.float32])

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) * w).sum()

  want = jax.grad(loss(lambda q, k, v: attention(q, k, v, seg, seg, backend="xla",
                                                 causal=causal)), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: blocked_attention(q, k, v, seg, seg, causal=causal,
                                                        block=32)), argnums=(0, 1, 2))(q, k, v)
  for g, r, name in zip(got, want, "qkv"):
    assert _max_error(g, r) <= TOL[jnp.float32], f"d{name}"


def test_only_blocks_that_share_a_segment_are_computed():
  """Four images of 64 tokens a row, blocks of 64: the 4 diagonal blocks of 16; an image
  across a block boundary adds the pairs it straddles."""
  aligned = jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), 64)[None]
  np.testing.assert_array_equal(block_pairs(aligned, aligned, 64)[0], np.eye(4, dtype=bool))
  shifted = jnp.concatenate([jnp.ones((1, 32), jnp.int32), aligned[:, :-32] + 1], axis=1)
  pairs = np.asarray(block_pairs(shifted, shifted, 64)[0])
  assert pairs.sum() == 4 + 2 * 3  # each of the 3 boundaries inside a block joins 2 blocks
  causal = np.asarray(block_pairs(shifted, shifted, 64, causal=True)[0])
  np.testing.assert_array_equal(causal, np.tril(pairs))


@pytest.mark.slow
def test_an_image_tower_with_blocked_attention_embeds_as_with_xla():
  rng = np.random.default_rng(0)
  towers = {b: ImageTower(variant="mu/8", posemb="learned_2d", posemb_resolution=4,
                          attention=b, rngs=nnx.Rngs(0)) for b in ("xla", "blocked")}
  seg = _packed_layouts(128)
  grid = np.array([4, 8], np.int32)
  positions = np.stack(np.divmod(np.arange(128) % 32, 8), -1).astype(np.int32)
  batch = {"patches": jnp.asarray(rng.integers(0, 256, (4, 128, 192)), jnp.uint8),
           "segment_ids": seg,
           "positions": jnp.broadcast_to(jnp.asarray(positions), (4, 128, 2)),
           "grid_hw": jnp.broadcast_to(jnp.asarray(grid), (4, 128, 2)),
           "image_mask": jnp.asarray(np.arange(48)[None] < seg.max(axis=1)[:, None])}
  want, mask = towers["xla"](batch)
  got, _ = towers["blocked"](batch)
  assert bool(mask.any())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
