"""The optimizer: an optax chain built from `config.optim`, with regex rules on parameter names.

Parameters are named by their path in the parameter pytree, joined with "/", e.g.
"image/encoder/blocks/0/attn/query/kernel" (see navit_clip.param_rules). Regular expressions over
these names, matched against the whole name (`re.fullmatch`), choose:
  - weight-decay multipliers: `wd_mults`, "regex=mult;regex=mult", then `wd_regex` with
    multiplier 1 (default: every "kernel"); the first rule that matches a name wins, names
    that none matches are not decayed (big_vision's wd_mults: JFT decays its head 100x);
  - learning-rate multipliers: `lr_mults`, "regex=mult;regex=mult", the first rule that
    matches a name wins, unmatched names get 1. Multiplier 0 freezes a parameter
    (`frozen_mask`): the trainer splits the frozen parameters off (`split_frozen`) and
    neither differentiates them nor gives them to the optimizer, so they get no update, no
    backward pass and no optimizer state (LiT freezes the image tower this way).

Per trainable parameter p with gradient g, one optimizer step is
  g <- clip(g)   (global norm over the trainable parameters, if clip_norm > 0)
  u <- direction(g)   (Adam: m / (sqrt(v) + eps), debiased; Adafactor: factored RMS)
  p <- p - mult(p) * lr(step) * (u + wd * wd_mult(p) * p)   (decoupled weight decay)

Gradient accumulation over grad_accum_steps = k > 1 micro-batches, by `grad_accum`:
  full_batch       (default) one train step takes the whole batch, embeds it in k
                   micro-batches and differentiates the loss over the whole batch
                   (`accumulated_value_and_grad`, gradient caching): every row keeps the
                   negatives of the whole batch, and the gradients are the whole batch's.
                   The optimizer is the plain chain, one update a step.
  per_micro_batch  each call is one micro-batch with its own loss; the gradients of k calls
                   are averaged and applied on the k-th (optax.MultiSteps); the other calls
                   return zero updates, and `step` in the schedule counts applied updates,
                   not calls (`calls_per_update`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from navit_clip.choices import check_choice, check_range, naming
from navit_clip.errors import UserError
from navit_clip.param_rules import first_match, flatten_names, parse_multipliers

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "linear", "constant")
GRAD_ACCUM = ("full_batch", "per_micro_batch")


def check_config(c: ml_collections.ConfigDict) -> None:
  """Checks `c` = config.optim; raises ValueError naming the key.

  That the regexes of wd_regex, wd_mults and lr_mults match some parameter is checked where
  the parameters are known (`make_optimizer`).
  """
  check_choice("config.optim.name", c.name, OPTIMIZERS)
  check_choice("config.optim.schedule", c.schedule, SCHEDULES)
  check_choice("config.optim.grad_accum", c.grad_accum, GRAD_ACCUM)
  for key in ("lr", "eps"):
    check_range(f"config.optim.{key}", c[key], 0.0, low_open=True)
  for key in ("rsqrt_timescale", "grad_accum_steps"):
    check_range(f"config.optim.{key}", c[key], 1)
  for key in ("warmup_steps", "cooldown_steps", "weight_decay", "clip_norm"):
    check_range(f"config.optim.{key}", c[key], 0)
  for key in ("b1", "b2"):
    check_range(f"config.optim.{key}", c[key], 0.0, 1.0, high_open=True)
  check_range("config.optim.end_lr_factor", c.end_lr_factor, 0.0, 1.0)
  try:
    re.compile(c.wd_regex)
  except re.error as e:
    raise ValueError(f"config.optim.wd_regex = {c.wd_regex!r} is not a regex: {e}") from e
  for key in ("lr_mults", "wd_mults"):
    with naming(f"config.optim.{key}", c[key]):
      parse_multipliers(c[key], key)


def parse_lr_mults(spec: str) -> list[tuple[str, float]]:
  """Parses "regex=mult;regex=mult" into [(regex, mult)]; "" gives [].

  The multiplier follows the last "=" of each rule, so regexes may contain "=".
  """
  return parse_multipliers(spec, "lr_mults")


def _check_matches(key: str, rules: list[tuple[str, Any]], params: Any) -> None:
  """Raises ValueError naming config.optim.`key` for a rule whose regex matches no name."""
  names = jax.tree.leaves(flatten_names(params))
  for pattern, _ in rules:
    if not any(re.fullmatch(pattern, n) for n in names):
      raise ValueError(f"config.optim.{key} regex {pattern!r} matches no parameter; "
                       f"names look like {names[:3]}")


def _lr_rules(c: ml_collections.ConfigDict, params: Any) -> list[tuple[str, float]]:
  """config.optim.lr_mults parsed, each regex checked to match some parameter of `params`."""
  rules = parse_lr_mults(c.lr_mults)
  _check_matches("lr_mults", rules, params)
  return rules


def _wd_rules(c: ml_collections.ConfigDict, params: Any) -> list[tuple[str, float]]:
  """The weight-decay multiplier rules: config.optim.wd_mults, then (wd_regex, 1).

  Each regex is checked to match some parameter of `params` (wd_regex only when wd_mults
  gives no rule of its own: "kernel" rules may take every name it would match).
  """
  rules = parse_multipliers(c.wd_mults, "wd_mults")
  _check_matches("wd_mults", rules, params)
  if not rules:
    _check_matches("wd_regex", [(c.wd_regex, 1.0)], params)
  return rules + [(c.wd_regex, 1.0)]


def _weight_decay(c: ml_collections.ConfigDict,
                  params: Any) -> list[optax.GradientTransformation]:
  """Decoupled weight decay (updates += wd * mult * p) by the multipliers of `_wd_rules`:
  one optax.add_decayed_weights per distinct multiplier > 0, masked to its parameters;
  [] when config.optim.weight_decay is 0."""
  if c.weight_decay <= 0:
    return []
  rules = _wd_rules(c, params)

  def mask(mult: float):
    return lambda tree: jax.tree.map(lambda n: first_match(n, rules, 0.0) == mult,
                                     flatten_names(tree))

  mults = sorted({m for _, m in rules if m > 0})
  return [optax.add_decayed_weights(c.weight_decay * m, mask=mask(m)) for m in mults]


def calls_per_update(c: ml_collections.ConfigDict) -> int:
  """Train steps per optimizer update: grad_accum_steps for per_micro_batch, else 1."""
  return c.grad_accum_steps if c.grad_accum == "per_micro_batch" else 1


def micro_batches(c: ml_collections.ConfigDict) -> int:
  """Micro-batches within one train step: grad_accum_steps for full_batch, else 1."""
  return c.grad_accum_steps if c.grad_accum == "full_batch" else 1


def _multiplier(name: str, rules: list[tuple[str, float]]) -> float:
  return first_match(name, rules, 1.0)


def frozen_mask(c: ml_collections.ConfigDict, params: Any) -> Any:
  """Pytree of bools like `params`: True where config.optim.lr_mults freezes the parameter."""
  rules = _lr_rules(c, params)
  return jax.tree.map(lambda n: _multiplier(n, rules) == 0, flatten_names(params))


def split_frozen(params: dict, frozen: Any) -> tuple[dict, dict]:
  """(trainable, frozen): nested dicts of the leaves of `params` where `frozen` is False / True.

  Args:
    params: a nested dict of parameters (nnx.to_pure_dict), arrays or abstract arrays.
    frozen: bools with the structure of `params` (`frozen_mask`).

  Returns:
    Two nested dicts that keep each leaf at its path in `params`; either may be {}.
    `merge_params` puts them back together.
  """
  mask = traverse_util.flatten_dict(frozen)
  parts: tuple[dict, dict] = ({}, {})
  for path, leaf in traverse_util.flatten_dict(params).items():
    parts[bool(mask[path])][path] = leaf
  return traverse_util.unflatten_dict(parts[0]), traverse_util.unflatten_dict(parts[1])


def merge_params(trainable: dict, frozen: dict) -> dict:
  """The parameter dict that `split_frozen` split into `trainable` and `frozen`."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable),
                                       **traverse_util.flatten_dict(frozen)})


def make_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer update, from `c` = config.optim.

  Linear warmup from 0 to `c.lr` over `c.warmup_steps`, then over the remaining steps:
    cosine:   cosine decay to lr * end_lr_factor at total_steps;
    linear:   linear decay to lr * end_lr_factor at total_steps;
    constant: lr;
    rsqrt:    lr / sqrt(1 + s / rsqrt_timescale), s = steps since warmup, times a linear
              cooldown to 0 over the last `cooldown_steps` (when > 0).

  Raises:
    UserError: `total_steps` (the run's optimizer updates) leaves no step after the
      warmup (and cooldown), naming config.train.total_steps and config.optim.warmup_steps.
  """
  if c.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule = {c.schedule!r}; expected one of "
                     f"{list(SCHEDULES)}")
  cooldown = c.cooldown_steps if c.schedule == "rsqrt" else 0
  decay_steps = total_steps - c.warmup_steps
  if c.warmup_steps < 0:
    raise UserError(f"config.optim.warmup_steps = {c.warmup_steps} must be >= 0")
  if decay_steps - cooldown < 1:
    after = f" + config.optim.cooldown_steps ({cooldown})" if cooldown else ""
    raise UserError(f"config.train.total_steps ({total_steps} optimizer updates) must exceed "
                    f"config.optim.warmup_steps ({c.warmup_steps}){after}: no step would be "
                    "left for the decay; raise the one or lower the other")
  lr, end = c.lr, c.lr * c.end_lr_factor
  if c.schedule == "cosine":
    decay = optax.schedules.cosine_decay_schedule(lr, decay_steps, alpha=c.end_lr_factor)
  elif c.schedule == "linear":
    decay = optax.schedules.linear_schedule(lr, end, decay_steps)
  elif c.schedule == "constant":
    decay = optax.schedules.constant_schedule(lr)
  else:
    decay = _rsqrt_schedule(lr, c.rsqrt_timescale, decay_steps, cooldown)
  if c.warmup_steps == 0:
    return decay
  warmup = optax.schedules.linear_schedule(0.0, lr, c.warmup_steps)
  return optax.schedules.join_schedules([warmup, decay], [c.warmup_steps])


def _rsqrt_schedule(lr: float, timescale: int, steps: int, cooldown: int) -> optax.Schedule:
  if timescale < 1:
    raise ValueError(f"config.optim.rsqrt_timescale must be >= 1, got {timescale}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    value = lr * jax.lax.rsqrt(1.0 + step / timescale)
    if cooldown:
      value *= jnp.clip((steps - step) / cooldown, 0.0, 1.0)
    return value

  return schedule


def _direction(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Gradients -> unscaled update direction of the chosen optimizer."""
  if c.name == "adamw":
    return optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)
  if c.name == "adafactor":
    # optax.adafactor's factored second moment, update clipping and momentum (b1 > 0),
    # without its relative step size: lr means the same as for adamw.
    parts = [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)]
    if c.b1 > 0:
      parts.append(optax.ema(c.b1, debias=False))
    return optax.chain(*parts)
  raise ValueError(f"config.optim.name = {c.name!r}; expected one of {list(OPTIMIZERS)}")


def _scale_by_multipliers(rules: list[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update by its name's lr multiplier (stateless).

  Its init and update raise ValueError for a frozen parameter (multiplier 0): frozen
  parameters never reach the optimizer (`split_frozen`).
  """

  def multipliers(tree):
    names = flatten_names(tree)
    frozen = [n for n in jax.tree.leaves(names) if _multiplier(n, rules) == 0]
    if frozen:
      raise ValueError(f"parameter {frozen[0]!r} is frozen by config.optim.lr_mults; give "
                       f"the optimizer the trainable parameters only (optim.split_frozen)")
    return jax.tree.map(lambda n: _multiplier(n, rules), names)

  def init(params):
    multipliers(params)
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers(updates)), state

  return optax.GradientTransformation(init, update)


def make_optimizer(c: ml_collections.ConfigDict, params: Any,
                   total_steps: int) -> optax.GradientTransformation:
  """The optax transformation described in the module docstring, from `c` = config.optim.

  Args:
    c: config.optim.
    params: every parameter (e.g. nnx.State of nnx.Param, or a pure dict), frozen ones
      included; only its names are read, to check that every regex matches some parameter.
    total_steps: number of optimizer updates in the run (for the schedule): train steps
      / `calls_per_update(c)`.

  Returns:
    An optax.GradientTransformation over the trainable parameters: pytrees of the
    structure of `split_frozen(params, frozen_mask(c, params))[0]`, which is all of
    `params` when nothing is frozen (leaves may be nnx.Variables or arrays, so it serves
    nnx.Optimizer).
  """
  rules = _lr_rules(c, params)
  if c.grad_accum_steps < 1:
    raise ValueError(f"config.optim.grad_accum_steps must be >= 1, got {c.grad_accum_steps}")
  parts = []
  if c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  parts.append(_direction(c))
  parts.extend(_weight_decay(c, params))
  parts.append(optax.scale_by_learning_rate(make_schedule(c, total_steps)))
  if any(m != 1.0 for _, m in rules):
    parts.append(_scale_by_multipliers(rules))
  tx = optax.chain(*parts)
  if calls_per_update(c) > 1:
    tx = optax.MultiSteps(tx, calls_per_update(c)).gradient_transformation()
  return tx


def _split_rows(tree: Any, k: int) -> Any:
  """Arrays [B, ...] -> [k, B / k, ...]: micro-batch i holds rows i, i + k, i + 2k, ...

  Strided, not in blocks, so that rows sharded in blocks over the batch devices stay on
  their devices: each device holds its share of every micro-batch.
  """
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]),
                                             0, 1), tree)


def _join_rows(tree: Any) -> Any:
  """The inverse of `_split_rows`: [k, B / k, ...] -> [B, ...] in the original row order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def accumulated_value_and_grad(features_fn, loss_fn, micro_batches: int):
  """Value and gradient of a loss over a whole batch, the towers run in micro-batches.

  The loss splits into `features_fn(params, rows)` -> pytree of [rows, ...] arrays (the
  towers, row by row) and `loss_fn(params, features, batch)` -> (loss, aux) over the
  features of all B rows (the contrastive logits: every row's negatives). Gradient caching,
  exact for any such split:
    1. the features of the k = `micro_batches` micro-batches of B / k rows, without grad;
    2. d loss / d features and the loss part's own parameter gradients, on the whole batch;
    3. per micro-batch, the vjp of `features_fn` with its rows of those cotangents, summed
       over micro-batches in a scan: one micro-batch's activations live at a time.
  The towers run forward twice (steps 1 and 3).

  Args:
    features_fn: (params, micro-batch) -> features; deterministic (step 3 recomputes 1).
    loss_fn: (params, features of all rows, batch) -> (float32 loss [], aux).
    micro_batches: k; the batch's rows B must be a multiple of it.

  Returns:
    (params, batch) -> ((loss, aux), grads), as jax.value_and_grad(has_aux=True) of the
    loss of the whole batch, equal to it up to float32 summation order.
  """

  def value_and_grad(params, batch):
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % micro_batches:
      raise ValueError(f"config.data.batch_size = {rows} rows do not split into "
                       f"config.optim.grad_accum_steps = {micro_batches} micro-batches")
    micro = _split_rows(batch, micro_batches)
    features = _join_rows(jax.lax.map(lambda rows: features_fn(params, rows), micro))
    (loss, aux), (grads, cotangents) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, features, batch)

    def add_micro_batch(total, xs):
      rows, cotangent = xs
      _, vjp = jax.vjp(lambda p: features_fn(p, rows), params)
      return jax.tree.map(jnp.add, total, vjp(cotangent)[0]), None

    grads, _ = jax.lax.scan(add_micro_batch, grads,
                            (micro, _split_rows(cotangents, micro_batches)))
    return (loss, aux), grads

  return value_and_grad
