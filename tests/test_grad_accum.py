"""Full-batch gradient accumulation: the towers run in micro-batches, the loss and its
gradients stay the whole batch's (every row's negatives), for both contrastive losses and
for classification; the train step built on it; per-micro-batch accumulation on request."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from navit_clip import optim
from navit_clip.data import pipeline
from navit_clip.data.batch import device_fields
from navit_clip.model import build_model
from navit_clip.train import make_train_step, step_options


def _model_and_batch(config):
  graphdef, params, rest = nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  batch = device_fields(next(iter(pipeline.make_train_dataset(config))))
  return graphdef, nnx.to_pure_dict(params), rest, jax.tree.map(jnp.asarray, batch)


def _whole_batch_value_and_grad(graphdef, rest, params, batch):
  def loss(p):
    return nnx.merge(graphdef, p, rest).loss(batch)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _accumulated_value_and_grad(graphdef, rest, params, batch, k):
  fn = optim.accumulated_value_and_grad(
      lambda p, rows: nnx.merge(graphdef, p, rest).features(rows),
      lambda p, f, whole: nnx.merge(graphdef, p, rest).loss_on_features(f, whole), k)
  return jax.jit(fn)(params, batch)


def _assert_trees_close(got, want):
  for (path, g), w in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("name,loss", [("demo", "sigmoid"), ("demo", "softmax"),
                                       ("demo_classification", "softmax_xent")])
def test_micro_batches_give_the_loss_and_gradients_of_the_whole_batch(tiny_config, name,
                                                                       loss):
  config = tiny_config(name)
  config.loss.name = loss
  graphdef, params, rest, batch = _model_and_batch(config)
  if "head" in params:  # a zero-initialised head passes no gradient to the tower
    params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(0),
                                                       params["head"]["kernel"].shape)
  assert batch["image_mask"].sum() > batch["image_mask"].shape[0]  # several images a row
  (want, want_aux), want_grads = _whole_batch_value_and_grad(graphdef, rest, params, batch)
  for k in (2, 4):  # 4 rows: 2 rows or 1 row a micro-batch
    (got, aux), grads = _accumulated_value_and_grad(graphdef, rest, params, batch, k)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _assert_trees_close(aux, want_aux)
    _assert_trees_close(grads, want_grads)
  # The tower gradients come only from the micro-batch pass: they are not zero.
  assert float(optax.tree.norm(grads["image"])) > 0


def test_the_loss_of_separate_micro_batches_is_another_loss(tiny_config):
  """What full-batch accumulation avoids: a micro-batch alone has fewer negatives (the
  softmax loss at initialisation is about log of the number of candidates)."""
  config = tiny_config()
  config.loss.name = "softmax"
  graphdef, params, rest, batch = _model_and_batch(config)
  (whole, _), _ = _whole_batch_value_and_grad(graphdef, rest, params, batch)
  halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
  separate = [float(_whole_batch_value_and_grad(graphdef, rest, params, h)[0][0])
              for h in halves]
  assert np.mean(separate) < float(whole) - 0.3


def test_train_step_with_micro_batches_is_the_whole_batch_step(tiny_config):
  config = tiny_config(steps=10)
  config.optim.update(grad_accum_steps=2, warmup_steps=0)
  graphdef, params, rest, batch = _model_and_batch(config)
  frozen = optim.frozen_mask(config.optim, params)
  assert optim.calls_per_update(config.optim) == 1  # full_batch: every step updates
  tx = optim.make_optimizer(config.optim, params, 10)
  schedule = optim.make_schedule(config.optim, 10)
  results = []
  for options in ({}, step_options(config)):
    assert options.get("micro_batches", 1) in (1, 2)
    step = jax.jit(make_train_step(graphdef, rest, tx, schedule, 1, frozen, **options))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    results.append(step(state, batch))
  (whole_state, whole), (micro_state, micro) = results
  for key in ("loss", "grad_norm", "t", "b", "lr"):
    np.testing.assert_allclose(micro[key], whole[key], rtol=1e-5, err_msg=key)
  assert int(micro_state["step"]) == 1
  assert not np.allclose(micro_state["params"]["logit_bias"], params["logit_bias"])
  _assert_trees_close(micro_state["params"], whole_state["params"])


def test_rows_must_split_into_the_micro_batches(tiny_config):
  config = tiny_config()
  graphdef, params, rest, batch = _model_and_batch(config)
  with pytest.raises(ValueError, match="batch_size = 4 rows do not split into "
                                       "config.optim.grad_accum_steps = 3"):
    _accumulated_value_and_grad(graphdef, rest, params, batch, 3)


def test_per_micro_batch_accumulates_over_steps_and_full_batch_within_one(tiny_config):
  c = tiny_config().optim
  c.grad_accum_steps = 4
  assert (optim.calls_per_update(c), optim.micro_batches(c)) == (1, 4)
  c.grad_accum = "per_micro_batch"
  assert (optim.calls_per_update(c), optim.micro_batches(c)) == (4, 1)
