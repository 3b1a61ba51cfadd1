"""Optimizer: schedules, parameter names, weight-decay mask, freezing (the frozen/trainable
split), multipliers, clipping, gradient accumulation, and use through nnx.Optimizer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from navit_clip import optim
from navit_clip.config import default_config


class _Tower(nnx.Module):

  def __init__(self, rngs):
    self.proj = nnx.Linear(2, 3, rngs=rngs)
    self.norm = nnx.LayerNorm(3, rngs=rngs)


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.image = _Tower(rngs)
    self.text = nnx.List([nnx.Linear(3, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])


def _params():
  return nnx.split(_Model(nnx.Rngs(0)), nnx.Param)[1]


def _config(**overrides):
  c = default_config().optim
  c.update(dict(warmup_steps=0, schedule="constant", lr=0.1, weight_decay=0.0,
                clip_norm=0.0), **overrides)
  return c


def _step(tx, params, grads, state=None):
  """One update on plain arrays, as nnx.Optimizer passes them."""
  params, grads = nnx.as_pure(params), nnx.as_pure(grads)
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), updates, state


def _grads(params, seed=0):
  keys = iter(jax.random.split(jax.random.key(seed), 100))
  return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), nnx.as_pure(params))


def test_flatten_names_on_nnx_state():
  params = _params()
  want = ["image/norm/bias", "image/norm/scale", "image/proj/bias", "image/proj/kernel",
          "text/0/bias", "text/0/kernel", "text/1/bias", "text/1/kernel"]
  for tree in (params, nnx.as_pure(params)):
    names = optim.flatten_names(tree)
    assert jax.tree.structure(names) == jax.tree.structure(tree)
    assert sorted(jax.tree.leaves(names)) == want
  assert optim.flatten_names({"a": [1, {"b": 2}]}) == {"a": ["a/0", {"b": "a/1/b"}]}


def test_schedules():
  c = _config(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_factor=0.1)
  s = optim.make_schedule(c, total_steps=110)
  for step, want in ((0, 0.0), (5, 0.5), (10, 1.0), (60, 0.55), (110, 0.1)):
    np.testing.assert_allclose(s(step), want, rtol=1e-5, atol=1e-7)
  c.schedule = "linear"
  s = optim.make_schedule(c, total_steps=110)
  np.testing.assert_allclose([s(10), s(60), s(110)], [1.0, 0.55, 0.1], rtol=1e-5)
  c.schedule = "constant"
  np.testing.assert_allclose(optim.make_schedule(c, 110)(100), 1.0)
  c.update(dict(schedule="rsqrt", rsqrt_timescale=10, cooldown_steps=20))
  s = optim.make_schedule(c, total_steps=110)
  np.testing.assert_allclose([s(10), s(40), s(90)], [1.0, 0.5, 1 / math.sqrt(9)], rtol=1e-5)
  np.testing.assert_allclose([s(100), s(110)], [0.5 / math.sqrt(10), 0.0], atol=1e-7,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(c, total_steps=30)


def test_weight_decay_on_kernels_only():
  params = _params()
  tx = optim.make_optimizer(_config(weight_decay=0.5), params, total_steps=10)
  zero = jax.tree.map(jnp.zeros_like, nnx.as_pure(params))
  new, _, _ = _step(tx, params, zero)
  for (path, p), q in zip(jax.tree.leaves_with_path(nnx.as_pure(params)),
                          jax.tree.leaves(new)):
    decay = 0.95 if path[-1].key == "kernel" else 1.0
    np.testing.assert_allclose(q, decay * p, rtol=1e-6, err_msg=str(path))


def test_weight_decay_multipliers_by_regex_first_match_wins():
  params = _params()
  c = _config(weight_decay=0.01, wd_mults="text/1/kernel=100; text/.*=0;image/norm/scale=2")
  zero = jax.tree.map(jnp.zeros_like, nnx.as_pure(params))
  new, _, _ = _step(optim.make_optimizer(c, params, total_steps=10), params, zero)
  want = {"text/1/kernel": 100.0, "text/0/kernel": 0.0, "text/0/bias": 0.0,
          "text/1/bias": 0.0, "image/norm/scale": 2.0, "image/proj/kernel": 1.0}  # wd_regex
  names = optim.flatten_names(nnx.as_pure(params))
  for n, p, q in zip(jax.tree.leaves(names), jax.tree.leaves(nnx.as_pure(params)),
                     jax.tree.leaves(new)):
    decay = 1 - 0.1 * 0.01 * want.get(n, 0.0)  # p -= lr * wd * mult * p
    np.testing.assert_allclose(q, decay * p, rtol=1e-6, err_msg=n)
  with pytest.raises(ValueError, match="config.optim.wd_mults regex 'vision/.*' matches no"):
    optim.make_optimizer(_config(weight_decay=0.1, wd_mults="vision/.*=2"), params, 10)
  with pytest.raises(ValueError, match="wd_mults rule text/.*=-1: multiplier must be >= 0"):
    optim.check_config(_config(wd_mults="text/.*=-1"))


def _same(a, b) -> bool:
  """The same pytree structure holding the very same leaf objects."""
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_frozen_mask_splits_params_and_merge_puts_them_back():
  params = nnx.to_pure_dict(_params())
  frozen = optim.frozen_mask(_config(lr_mults="image/proj/.*=0;image/.*=0.5"), params)
  named = dict(zip(jax.tree.leaves(optim.flatten_names(params)), jax.tree.leaves(frozen)))
  assert sorted(n for n, f in named.items() if f) == ["image/proj/bias", "image/proj/kernel"]
  trainable, fixed = optim.split_frozen(params, frozen)
  assert _same(fixed, {"image": {"proj": params["image"]["proj"]}})
  assert _same(trainable, {"image": {"norm": params["image"]["norm"]}, "text": params["text"]})
  assert _same(optim.merge_params(trainable, fixed), params)
  assert _same(optim.split_frozen(params, jax.tree.map(lambda _: False, params)), (params, {}))


def test_only_trainable_params_reach_the_optimizer():
  params = nnx.to_pure_dict(_params())
  c = _config(lr_mults="image/.*=0", weight_decay=0.1)
  trainable, _ = optim.split_frozen(params, optim.frozen_mask(c, params))
  tx = optim.make_optimizer(c, params, 10)
  state = None
  new = trainable
  for seed in range(2):
    new, _, state = _step(tx, new, _grads(trainable, seed), state)
  for p, q in zip(jax.tree.leaves(trainable), jax.tree.leaves(new)):
    assert not np.allclose(p, q)
  text_size = sum(p.size for p in jax.tree.leaves(params["text"]))
  state_size = sum(x.size for x in jax.tree.leaves(state) if x.ndim)  # not step counts
  assert state_size == 2 * text_size  # Adam's mu and nu, for the text side only
  with pytest.raises(ValueError, match="'image/norm/bias' is frozen by config.optim.lr_mults"):
    _step(tx, params, _grads(params))


def test_lr_multiplier_scales_update():
  params = _params()
  grads = _grads(params)
  _, base, _ = _step(optim.make_optimizer(_config(), params, 10), params, grads)
  tx = optim.make_optimizer(_config(lr_mults="text/1/.*=0.25;text/.*=2"), params, 10)
  _, scaled, _ = _step(tx, params, grads)
  names = optim.flatten_names(base)
  for n, u, v in zip(jax.tree.leaves(names), jax.tree.leaves(base), jax.tree.leaves(scaled)):
    mult = 0.25 if n.startswith("text/1/") else 2.0 if n.startswith("text/") else 1.0
    np.testing.assert_allclose(v, mult * u, rtol=1e-6, err_msg=n)


def test_clipping():
  # With a large eps Adam's first step is g / (|g| + eps): not scale-invariant.
  params = _params()
  grads = jax.tree.map(lambda g: 10 * g, _grads(params))
  norm = optax.tree.norm(grads)
  clipped = optim.make_optimizer(_config(clip_norm=1.0, eps=1.0), params, 10)
  plain = optim.make_optimizer(_config(eps=1.0), params, 10)
  _, u_clip, _ = _step(clipped, params, grads)
  _, u_want, _ = _step(plain, params, jax.tree.map(lambda g: g / norm, grads))
  _, u_raw, _ = _step(plain, params, grads)
  for a, b, c in zip(jax.tree.leaves(u_clip), jax.tree.leaves(u_want), jax.tree.leaves(u_raw)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_grad_accumulation_equals_one_big_step(name):
  params = _params()
  micro = [_grads(params, seed) for seed in range(3)]
  mean = jax.tree.map(lambda *g: sum(g) / 3, *micro)
  c = _config(name=name, weight_decay=0.1, clip_norm=0.5)
  _, want, _ = _step(optim.make_optimizer(c, params, 10), params, mean)
  c.update(grad_accum_steps=3, grad_accum="per_micro_batch")
  tx = optim.make_optimizer(c, params, 10)
  state = None
  for i, g in enumerate(micro):
    _, updates, state = _step(tx, params, g, state)
    if i < 2:
      assert not any(np.any(u) for u in jax.tree.leaves(updates))
  for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_nnx_optimizer_descends(name):
  model = _Model(nnx.Rngs(0))
  c = _config(name=name, lr=0.05, lr_mults="image/norm/.*=0.5", weight_decay=1e-3,
              clip_norm=1.0)
  opt = nnx.Optimizer(model, optim.make_optimizer(c, nnx.state(model, nnx.Param), 10),
                      wrt=nnx.Param)
  x = jnp.ones((4, 2))

  def loss_fn(m):
    h = m.image.norm(m.image.proj(x))
    return jnp.sum(m.text[1](m.text[0](h)) ** 2)

  first = loss_fn(model)
  for _ in range(3):
    opt.update(model, nnx.grad(loss_fn)(model))
  assert loss_fn(model) < first


def test_bad_config_names_the_problem():
  params = _params()
  with pytest.raises(ValueError, match="'vision/.*' matches no parameter"):
    optim.make_optimizer(_config(lr_mults="vision/.*=0"), params, 10)
  with pytest.raises(ValueError, match="'vision/.*' matches no parameter"):
    optim.frozen_mask(_config(lr_mults="vision/.*=0"), params)
  with pytest.raises(ValueError, match="wd_regex"):
    optim.make_optimizer(_config(weight_decay=0.1, wd_regex="w"), params, 10)
  with pytest.raises(ValueError, match="config.optim.name = 'sgd'"):
    optim.make_optimizer(_config(name="sgd"), params, 10)
  with pytest.raises(ValueError, match="bad multiplier"):
    optim.parse_lr_mults("image/.*=x")
  with pytest.raises(ValueError, match="not 'regex=multiplier'"):
    optim.parse_lr_mults("image/.*")
  assert optim.parse_lr_mults(" a(?=b)=0.5; c=0 ;") == [("a(?=b)", 0.5), ("c", 0.0)]
