"""Losses: NumPy reference values, and empty slots changing neither loss nor gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from navit_clip import losses
from navit_clip.config_defaults import default_config

B, M, D, K = 2, 3, 4, 5
# Valid slots, in flattened order 0, 2, 3, 4: four images in a [2, 3] batch.
VALID = np.array([[True, False, True], [True, True, False]])
VALID_IDX = np.flatnonzero(VALID.reshape(-1))
N_VALID = len(VALID_IDX)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _padded_and_compact(rng, trailing, garbage):
  """A [B, M, *trailing] array with garbage in empty slots, and its [1, n, ...] compaction."""
  compact = rng.standard_normal((1, N_VALID, *trailing)).astype(np.float32)
  padded = np.full((B * M, *trailing), garbage, np.float32)
  padded[VALID_IDX] = compact[0]
  return padded.reshape(B, M, *trailing), compact


def _np_sigmoid_loss(x, y, t, b):
  logits = t * x @ y.T + b
  z = 2 * np.eye(len(x)) - 1
  return np.sum(np.log1p(np.exp(-z * logits))) / len(x)


def _np_softmax_loss(x, y, t):
  logits = t * x @ y.T

  def xent(l):
    l = l - l.max(axis=1, keepdims=True)
    return -np.mean(np.diag(l) - np.log(np.exp(l).sum(axis=1)))

  return 0.5 * (xent(logits) + xent(logits.T))


@pytest.mark.parametrize("name", losses.CONTRASTIVE_LOSSES)
def test_contrastive_matches_numpy(name):
  rng = np.random.default_rng(0)
  img = _unit(rng.standard_normal((B, M, D))).astype(np.float32)
  txt = _unit(rng.standard_normal((B, M, D))).astype(np.float32)
  t_prime, b = math.log(3.0), -1.5
  loss, metrics = losses.contrastive_loss_fn(name)(img, txt, jnp.asarray(VALID), t_prime, b)
  x = img.reshape(-1, D)[VALID_IDX].astype(np.float64)
  y = txt.reshape(-1, D)[VALID_IDX].astype(np.float64)
  want = _np_sigmoid_loss(x, y, 3.0, b) if name == "sigmoid" else _np_softmax_loss(x, y, 3.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["t"], 3.0, rtol=1e-6)
  assert metrics["b"] == b and metrics["n_valid"] == N_VALID


@pytest.mark.parametrize("name", losses.CONTRASTIVE_LOSSES)
@pytest.mark.parametrize("garbage", [7.0, np.nan])
def test_contrastive_empty_slots_change_nothing(name, garbage):
  rng = np.random.default_rng(1)
  img, img_c = _padded_and_compact(rng, (D,), garbage)
  txt, txt_c = _padded_and_compact(rng, (D,), garbage)
  img, img_c, txt, txt_c = (_unit(a) for a in (img, img_c, txt, txt_c))
  scale_bias = (jnp.float32(math.log(10.0)), jnp.float32(-10.0))

  def f(i, t, sb, valid):
    return losses.contrastive_loss_fn(name)(i, t, valid, *sb)[0]

  grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  loss_p, (gi_p, gt_p, gsb_p) = grad(img, txt, scale_bias, jnp.asarray(VALID))
  loss_c, (gi_c, gt_c, gsb_c) = grad(img_c, txt_c, scale_bias, jnp.ones((1, N_VALID), bool))
  np.testing.assert_allclose(loss_p, loss_c, rtol=1e-6)
  for g_p, g_c in ((gi_p, gi_c), (gt_p, gt_c)):
    g_p = np.asarray(g_p).reshape(B * M, D)
    np.testing.assert_allclose(g_p[VALID_IDX], g_c[0], rtol=1e-5, atol=1e-7)
    assert not np.any(np.delete(g_p, VALID_IDX, axis=0))
  np.testing.assert_allclose(gsb_p, gsb_c, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(np.asarray(gsb_p)))


def test_no_valid_slot_gives_zero_loss_and_finite_gradients():
  x = jnp.ones((B, M, D)) / 2.0
  for name in losses.CONTRASTIVE_LOSSES:
    loss, g = jax.value_and_grad(
        lambda s: losses.contrastive_loss_fn(name)(x, x, jnp.zeros((B, M), bool), s, -10.0)[0])(
            jnp.float32(1.0))
    assert loss == 0.0 and g == 0.0


def _np_log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_classification_matches_numpy_and_metrics():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((B, M, K)).astype(np.float32)
  multi_hot = (rng.random((B, M, K)) < 0.4).astype(np.float32)
  ids = rng.integers(0, K, (B, M)).astype(np.int32)
  valid = jnp.asarray(VALID)
  x = logits.reshape(-1, K)[VALID_IDX].astype(np.float64)
  y = multi_hot.reshape(-1, K)[VALID_IDX]
  c = ids.reshape(-1)[VALID_IDX]

  loss, metrics = losses.sigmoid_xent_loss(logits, multi_hot, valid)
  want = -np.sum(y * _np_log_sigmoid(x) + (1 - y) * _np_log_sigmoid(-x)) / N_VALID
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["prec@1"], np.mean(y[np.arange(N_VALID),
                                                          x.argmax(1)]), rtol=1e-6)

  loss, metrics = losses.softmax_xent_loss(logits, ids, valid)
  logp = x - x.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -np.mean(logp[np.arange(N_VALID), c]), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(x.argmax(1) == c), rtol=1e-6)
  assert metrics["n_valid"] == N_VALID


@pytest.mark.parametrize("name", losses.CLASSIFICATION_LOSSES)
def test_classification_empty_slots_change_nothing(name):
  rng = np.random.default_rng(3)
  logits, logits_c = _padded_and_compact(rng, (K,), np.nan)
  if name == "sigmoid_xent":
    labels, labels_c = _padded_and_compact(rng, (K,), np.nan)
    labels, labels_c = (labels > 0).astype(np.float32), (labels_c > 0).astype(np.float32)
  else:
    labels_c = rng.integers(0, K, (1, N_VALID)).astype(np.int32)
    labels = np.full(B * M, -7, np.int32)
    labels[VALID_IDX] = labels_c[0]
    labels = labels.reshape(B, M)

  def f(x, y, valid):
    return losses.classification_loss_fn(name)(x, y, valid)

  grad = jax.value_and_grad(f, has_aux=True)
  (loss_p, m_p), g_p = grad(logits, labels, jnp.asarray(VALID))
  (loss_c, m_c), g_c = grad(logits_c, labels_c, jnp.ones((1, N_VALID), bool))
  np.testing.assert_allclose(loss_p, loss_c, rtol=1e-6)
  for key in m_c:
    np.testing.assert_allclose(m_p[key], m_c[key], rtol=1e-6)
  g_p = np.asarray(g_p).reshape(B * M, K)
  np.testing.assert_allclose(g_p[VALID_IDX], g_c[0], rtol=1e-5, atol=1e-7)
  assert not np.any(np.delete(g_p, VALID_IDX, axis=0))


def test_init_logit_params():
  assert losses.init_logit_params("sigmoid") == (math.log(10.0), -10.0)
  t_prime, b = losses.init_logit_params("softmax")
  assert math.isclose(math.exp(t_prime), 1 / 0.07) and b is None
  assert losses.init_logit_params("sigmoid", 5.0, 0.0) == (math.log(5.0), 0.0)
  with pytest.raises(ValueError, match="no bias"):
    losses.init_logit_params("softmax", init_b=-10.0)
  with pytest.raises(ValueError, match="unknown contrastive loss 'sigmoid_xent'"):
    losses.init_logit_params("sigmoid_xent")


def test_max_logit_scale_is_clip_s_100_for_softmax_and_free_for_sigmoid():
  loss = default_config().loss
  for name, want in (("softmax", math.log(100.0)), ("sigmoid", None), ("softmax_xent", None)):
    loss.name = name
    assert losses.max_logit_scale(loss) == want
  loss.name, loss.max_t = "sigmoid", 50.0
  assert losses.max_logit_scale(loss) == math.log(50.0)
  loss.name, loss.max_t = "softmax", 0.0  # no clamp
  assert losses.max_logit_scale(loss) is None
  loss.name, loss.max_t = "softmax_xent", 100.0
  with pytest.raises(ValueError, match="config.loss.max_t applies to the contrastive losses"):
    losses.check_config(loss)


def test_bad_inputs_name_the_problem():
  x = jnp.zeros((B, M, D))
  valid = jnp.asarray(VALID)
  with pytest.raises(ValueError, match="unknown contrastive loss 'siglip'"):
    losses.contrastive_loss_fn("siglip")
  with pytest.raises(ValueError, match="unknown classification loss 'sigmoid'"):
    losses.classification_loss_fn("sigmoid")
  with pytest.raises(ValueError, match="txt must be"):
    losses.sigmoid_loss(x, x[:, :2], valid, 0.0)
  with pytest.raises(ValueError, match="valid must be bool"):
    losses.sigmoid_loss(x, x, valid.astype(jnp.int32), 0.0)
  with pytest.raises(ValueError, match="logit_scale must be a scalar"):
    losses.sigmoid_loss(x, x, valid, jnp.zeros(2))
  with pytest.raises(ValueError, match="integer"):
    losses.softmax_xent_loss(x, jnp.zeros((B, M)), valid)
  with pytest.raises(ValueError, match=r"txt embeddings differ in shape: \[.*\] vs"):
    losses.sigmoid_loss(x, x[..., :2], valid, 0.0)
  with pytest.raises(ValueError, match="logits and multi-hot labels differ in shape"):
    losses.sigmoid_xent_loss(x, x[..., :2], valid)


def test_a_loss_is_chosen_once_by_name_and_chunking():
  assert losses.contrastive_loss_fn("softmax") is losses.contrastive_loss_fn("softmax")
  for name, fn in (("sigmoid", losses.sigmoid_loss), ("softmax", losses.softmax_loss)):
    for chunked in (False, True):
      chosen = losses.contrastive_loss_fn(name, chunked=chunked)
      assert chosen.func is fn and chosen.keywords == {"chunked": chunked}
  assert losses.classification_loss_fn("softmax_xent") is losses.softmax_xent_loss
  with pytest.raises(ValueError, match="unknown contrastive loss 'sigmoid_xent'"):
    losses.contrastive_loss_fn("sigmoid_xent", chunked=True)
