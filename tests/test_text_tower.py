"""Text tower: shapes, caption masking at EOS, pooling, causal attention, empty captions.

The masking tests run every pool that reads real tokens only; "last" reads the padding too
(SigLIP's text tower) and has tests of its own.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from navit_clip import config
from navit_clip.attention import attention
from navit_clip.text.tower import TEXT_POOLS, TextTower, caption_segments

VOCAB, T, EOS, OUT = 32, 8, 1, 16
POOLS = tuple(p for p in TEXT_POOLS if p != "last")
POOL_CAUSAL = list(itertools.product(POOLS, (False, True)))

# Two captions (EOS at 3 and 5) then an empty slot; ids after EOS are padding (0).
TOKENS = np.array([[5, 6, 7, EOS, 0, 0, 0, 0],
                   [9, 8, 7, 6, 5, EOS, 0, 0],
                   [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)


@functools.cache  # towers are only read, never updated, by these tests
def tower(pool="eos", causal=False, depth=2, max_len=T) -> TextTower:
  return TextTower(vocab_size=VOCAB, max_len=max_len, width=32, depth=depth, mlp_dim=64,
                   num_heads=2, out_dim=OUT, eos_id=EOS, pool=pool, causal=causal,
                   rngs=nnx.Rngs(0))


def test_caption_segments():
  seg, eos = caption_segments(jnp.asarray(TOKENS), EOS)
  np.testing.assert_array_equal(eos, [3, 5, 0])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 1, 0, 0, 0, 0],
                                      [1, 1, 1, 1, 1, 1, 0, 0],
                                      [0] * 8])
  # A later EOS (sticky-EOS padding) does not extend the caption.
  seg, eos = caption_segments(jnp.asarray([[4, EOS, EOS, 4]]), EOS)
  np.testing.assert_array_equal(seg, [[1, 1, 0, 0]])
  np.testing.assert_array_equal(eos, [1])


@pytest.mark.parametrize("pool", POOLS)
def test_packed_batch_shape_matches_flat_captions(pool):
  m = tower(pool, depth=1)
  batch = np.stack([TOKENS, TOKENS[::-1]])  # [B=2, M=3, T]
  out = m(batch)
  assert out.shape == (2, 3, OUT) and out.dtype == jnp.float32
  np.testing.assert_allclose(out.reshape(6, OUT), m(batch.reshape(6, T)), atol=1e-6)


@pytest.mark.parametrize("pool,causal", POOL_CAUSAL)
def test_output_ignores_tokens_after_eos(pool, causal):
  m = tower(pool, causal)
  noisy = TOKENS.copy()
  rng = np.random.default_rng(0)
  for row, eos in ((0, 3), (1, 5)):
    noisy[row, eos + 1:] = rng.integers(0, VOCAB, T - eos - 1)  # any ids, EOS included
  noisy[0, 5] = EOS
  np.testing.assert_allclose(m(noisy)[:2], m(TOKENS)[:2], atol=1e-5)
  # Control: a token before the EOS does change the output.
  changed = TOKENS.copy()
  changed[0, 1] = 20
  assert np.abs(m(changed)[0] - m(TOKENS)[0]).max() > 1e-3


@pytest.mark.parametrize("pool", POOLS)
def test_output_does_not_depend_on_padded_length(pool):
  m = tower(pool, max_len=12)
  short = TOKENS[:2, :6]  # both captions end by position 5
  long = np.pad(TOKENS[:2], ((0, 0), (0, 4)))
  np.testing.assert_allclose(m(short), m(long), atol=1e-5)


def test_eos_pool_reads_each_captions_eos():
  m = tower("eos")
  feats, _ = m.token_features(jnp.asarray(TOKENS[:2]))
  want = m.proj(feats[jnp.arange(2), jnp.array([3, 5])])
  np.testing.assert_allclose(m(TOKENS[:2]), want, atol=1e-6)
  assert np.abs(m.proj(feats[:, -1]) - want).max() > 1e-3  # not the last position


def test_last_pool_reads_the_last_position_and_the_padding():
  m = tower("last")
  feats, segment_ids = m.token_features(jnp.asarray(TOKENS[:2]))
  np.testing.assert_array_equal(segment_ids, 1)  # no padding mask
  np.testing.assert_allclose(m(TOKENS[:2]), m.proj(feats[:, -1]), atol=1e-6)
  sticky = np.where(TOKENS[:2] == 0, EOS, TOKENS[:2])  # padded with EOS instead of 0
  assert np.abs(m(sticky) - m(TOKENS[:2])).max() > 1e-3


@pytest.mark.parametrize("causal", (False, True))
def test_no_gradient_reaches_tokens_after_eos(causal):
  m = tower("eos", causal)
  tokens = TOKENS[:2].copy()
  tokens[0, 4:] = [20, 21, 20, 21]  # ids used only after the EOS
  graph, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params):
    return nnx.merge(graph, params, rest)(tokens).sum()

  grad = np.asarray(jax.grad(loss)(params)["embed"]["embedding"][...])
  assert np.abs(grad[[20, 21]]).max() == 0.0
  assert np.abs(grad[[5, 6, 7, EOS]]).min(axis=1).max() > 0.0


def test_causal_features_do_not_see_later_tokens():
  tokens = TOKENS[1:2].copy()
  changed = tokens.copy()
  changed[0, 3] = 20  # before the EOS at 5
  for causal in (True, False):
    m = tower("eos", causal)
    before, _ = m.token_features(jnp.asarray(tokens))
    after, _ = m.token_features(jnp.asarray(changed))
    earlier_diff = np.abs(after[0, :3] - before[0, :3]).max()
    if causal:
      assert earlier_diff == 0.0
    else:
      assert earlier_diff > 1e-3
    assert np.abs(after[0, 3:6] - before[0, 3:6]).max() > 1e-3


@pytest.mark.parametrize("pool,causal", [*POOL_CAUSAL, ("last", False)])
def test_empty_captions_are_finite_with_finite_gradients(pool, causal):
  m = tower(pool, causal, depth=1)
  empty = np.zeros((2, T), np.int32)
  graph, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params):
    return nnx.merge(graph, params, rest)(empty).sum()

  value, grad = jax.value_and_grad(loss)(params)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))


def test_causal_attention_matches_reference():
  rng = np.random.default_rng(0)
  b, l, h, d = 2, 5, 2, 4
  q, k, v = (rng.normal(size=(b, l, h, d)).astype(np.float32) for _ in range(3))
  seg = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  out = attention(q, k, v, seg, seg, causal=True)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & np.tril(np.ones((l, l), bool))
  weights = np.exp(np.where(allowed, logits, -np.inf) - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", weights, v), atol=1e-5)
  with pytest.raises(ValueError, match="causal attention is not implemented by the 'splash'"):
    attention(q, k, v, seg, seg, backend="splash", causal=True)


def test_bad_inputs_are_named():
  m = tower(depth=1)
  with pytest.raises(ValueError, match="max_len=8"):
    m(np.zeros((1, T + 1), np.int32))
  with pytest.raises(TypeError, match="integer"):
    m(np.zeros((1, T), np.float32))
  with pytest.raises(ValueError, match="pool"):
    tower("cls")


def test_from_config_and_validation():
  c = config.default_config()
  config.validate(c)
  c.model.text.update(variant="mu", vocab_size=VOCAB, max_len=T, pool="mean", causal=True)
  m = TextTower.from_config(c.model.text, OUT, rngs=nnx.Rngs(0))
  assert m(TOKENS).shape == (3, OUT)
  c.model.text.variant = "mu/16"
  with pytest.raises(ValueError, match="config.model.text.variant"):
    config.validate(c)
  c.model.text.update(variant="mu", eos_id=VOCAB)
  with pytest.raises(ValueError, match="config.model.text.eos_id"):
    config.validate(c)
