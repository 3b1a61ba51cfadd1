"""The train step and the loop around it: freezing, the model's own loss, log messages."""

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from navit_clip import losses, optim, sharding
from navit_clip.config import default_config
from navit_clip.model import build_model
from navit_clip.param_rules import flatten_names
from navit_clip.train import make_train_step, step_options, train


class _TwoParts(nnx.Module):
  """A stand-in for a model: an "image" and a "text" layer, and the loss the step calls."""

  def __init__(self, rngs):
    self.image = nnx.Linear(3, 4, rngs=rngs)
    self.text = nnx.Linear(4, 1, rngs=rngs)

  def loss(self, batch):
    y = self.text(jnp.tanh(self.image(batch["x"])))
    return jnp.mean((y - batch["y"]) ** 2), {}


def _names(tree) -> list[str]:
  return sorted(jax.tree.leaves(flatten_names(tree)))


def test_frozen_params_are_neither_differentiated_nor_optimized():
  graphdef, params, rest = nnx.split(_TwoParts(nnx.Rngs(0)), nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  c = default_config().optim
  c.update(lr=0.1, warmup_steps=0, schedule="constant", lr_mults="image/.*=0")
  frozen = optim.frozen_mask(c, params)
  inner = optim.make_optimizer(c, params, 10)
  seen = []  # the gradients the optimizer is given, by name (recorded when traced)

  def update(grads, state, params=None):
    seen.append(_names(grads))
    return inner.update(grads, state, params)

  tx = optax.GradientTransformation(inner.init, update)
  state = {"params": params, "opt_state": tx.init(optim.split_frozen(params, frozen)[0]),
           "step": jnp.zeros((), jnp.int32)}
  assert not [n for n in _names(state["opt_state"]) if "image" in n]
  step = jax.jit(make_train_step(graphdef, rest, tx, optim.make_schedule(c, 10), 1, frozen))
  batch = {"x": jnp.ones((8, 3)), "y": jnp.full((8, 1), 2.0)}
  losses_seen = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses_seen.append(float(metrics["loss"]))
  assert seen == [["text/bias", "text/kernel"]]
  assert losses_seen[-1] < losses_seen[0]
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(state["params"]["image"][name], params["image"][name])
    assert not np.array_equal(state["params"]["text"][name], params["text"][name])


def test_the_model_holds_the_loss_that_config_loss_chose(tiny_config):
  config = tiny_config()
  for name in losses.CONTRASTIVE_LOSSES:
    for chunked in (False, True):
      config.loss.name, config.loss.chunked = name, chunked
      model = build_model(config, rngs=nnx.Rngs(0))
      assert model.loss_fn is losses.contrastive_loss_fn(name, chunked=chunked)
  # The same choice gives the same graph: a rebuilt model compares equal.
  assert nnx.graphdef(model) == nnx.graphdef(build_model(config, rngs=nnx.Rngs(1)))
  classifier = tiny_config("demo_classification")
  assert build_model(classifier, rngs=nnx.Rngs(0)).loss_fn is losses.softmax_xent_loss


@pytest.mark.slow
def test_a_stopped_run_logs_the_stop_and_its_resumption_logs_the_step(
    tiny_config, tmp_path, monkeypatch, caplog):
  config = tiny_config(steps=4)
  config.train.log_every = 1
  feed, calls = sharding.global_batch, []

  def feed_then_sigterm(*args):
    calls.append(1)
    if len(calls) == 2:  # the guard turns it into a stop after this step
      os.kill(os.getpid(), signal.SIGTERM)
    return feed(*args)

  monkeypatch.setattr(sharding, "global_batch", feed_then_sigterm)
  with caplog.at_level(logging.INFO, logger="navit_clip.train"):
    stopped = train(config, str(tmp_path))
    monkeypatch.setattr(sharding, "global_batch", feed)
    resumed = train(config, str(tmp_path))
  assert (stopped.stopped_by, stopped.final_step, resumed.final_step) == ("SIGTERM", 2, 4)
  messages = [(r.levelname, r.getMessage()) for r in caplog.records]
  compiling = [m for m in messages if m[1].startswith("compiling the train step")]
  checkpoints = os.path.join(str(tmp_path), "checkpoints")
  assert len(compiling) == 2  # one per run, before its first step
  assert [m for m in messages if m not in compiling] == [
      ("WARNING", f"stopped by SIGTERM after step 2; saved to {checkpoints}"),
      ("INFO", f"resumed from {checkpoints} at step 2")]


class _Temperature(nnx.Module):
  """A stand-in whose loss always wants a larger temperature t = exp(logit_scale)."""

  def __init__(self):
    self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

  def loss(self, batch):
    del batch
    return -self.logit_scale[...], {}


@pytest.mark.parametrize("loss,ceiling", [("softmax", 100.0), ("sigmoid", None)])
def test_softmax_temperature_is_clamped_at_100_after_every_update(tiny_config, loss, ceiling):
  config = tiny_config()
  config.loss.name = loss
  config.optim.update(lr=10.0, warmup_steps=0, schedule="constant", clip_norm=0.0,
                      weight_decay=0.0)
  graphdef, params, rest = nnx.split(_Temperature(), nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  frozen = optim.frozen_mask(config.optim, params)
  tx = optim.make_optimizer(config.optim, params, 10)
  step = jax.jit(make_train_step(graphdef, rest, tx, optim.make_schedule(config.optim, 10), 1,
                                 frozen, **step_options(config)))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  for _ in range(3):  # Adam moves t' by about lr = 10 a step
    state, _ = step(state, {})
    t = float(np.exp(state["params"]["logit_scale"]))
    if ceiling is None:  # SigLIP leaves t free
      assert t > 100.0
    else:
      assert t <= ceiling * (1 + 1e-6)
  config.loss.max_t = 0.0  # no clamp
  assert step_options(config)["max_logit_scale"] is None


def test_a_softmax_model_has_no_logit_bias(tiny_config):
  config = tiny_config()
  for loss, has_bias in (("softmax", False), ("sigmoid", True)):
    config.loss.name = loss
    model = build_model(config, rngs=nnx.Rngs(0))
    names = _names(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert ("logit_bias" in names) == has_bias and "logit_scale" in names
