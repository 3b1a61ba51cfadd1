"""The optimizer: an optax chain built from `config.optim`, with regex rules on parameter names.

Parameters are named by their path in the parameter pytree, joined with "/", e.g.
"image/encoder/blocks/0/attn/query/kernel" (see navit_clip.param_rules). Regular expressions over
these names, matched against the whole name (`re.fullmatch`), choose:
  - weight decay: `wd_regex` (default: every "kernel");
  - learning-rate multipliers: `lr_mults`, "regex=mult;regex=mult", the first rule that
    matches a name wins, unmatched names get 1. Multiplier 0 freezes a parameter: its update
    is zero and it holds no optimizer state (LiT freezes the image tower this way).

Per trainable parameter p with gradient g, one optimizer step is
  g <- clip(g)   (global norm over the trainable parameters, if clip_norm > 0)
  u <- direction(g)   (Adam: m / (sqrt(v) + eps), debiased; Adafactor: factored RMS)
  p <- p - mult(p) * lr(step) * (u + wd * p)   (decoupled weight decay, masked)
With grad_accum_steps = k > 1 the gradients of k calls are averaged and applied on the
k-th (optax.MultiSteps); the other calls return zero updates, and `step` in the schedule
counts applied updates, not calls.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from navit_clip.param_rules import first_match, flatten_names, split_rules

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "linear", "constant")

_TRAIN, _FROZEN = "train", "frozen"


def parse_lr_mults(spec: str) -> list[tuple[str, float]]:
  """Parses "regex=mult;regex=mult" into [(regex, mult)]; "" gives [].

  The multiplier follows the last "=" of each rule, so regexes may contain "=".
  """
  rules = []
  for pattern, mult in split_rules(spec, "lr_mults", "multiplier"):
    try:
      value = float(mult)
    except ValueError as e:
      raise ValueError(f"lr_mults rule {pattern}={mult}: bad multiplier {mult!r}") from e
    if value < 0:
      raise ValueError(f"lr_mults rule {pattern}={mult}: multiplier must be >= 0")
    rules.append((pattern, value))
  return rules


def _multiplier(name: str, rules: list[tuple[str, float]]) -> float:
  return first_match(name, rules, 1.0)


def frozen_mask(c: ml_collections.ConfigDict, params: Any) -> Any:
  """Pytree of bools like `params`: True where config.optim.lr_mults freezes the parameter."""
  rules = parse_lr_mults(c.lr_mults)
  return jax.tree.map(lambda n: _multiplier(n, rules) == 0, flatten_names(params))


def make_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer update, from `c` = config.optim.

  Linear warmup from 0 to `c.lr` over `c.warmup_steps`, then over the remaining steps:
    cosine:   cosine decay to lr * end_lr_factor at total_steps;
    linear:   linear decay to lr * end_lr_factor at total_steps;
    constant: lr;
    rsqrt:    lr / sqrt(1 + s / rsqrt_timescale), s = steps since warmup, times a linear
              cooldown to 0 over the last `cooldown_steps` (when > 0).
  """
  if c.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule = {c.schedule!r}; expected one of "
                     f"{list(SCHEDULES)}")
  cooldown = c.cooldown_steps if c.schedule == "rsqrt" else 0
  decay_steps = total_steps - c.warmup_steps
  if c.warmup_steps < 0 or decay_steps - cooldown < 1:
    raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps "
                     f"({c.warmup_steps}) + cooldown_steps ({cooldown}), warmup_steps >= 0")
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
  """Multiplies each update by its name's lr multiplier (stateless)."""

  def scale(updates, params=None):
    del params
    return jax.tree.map(lambda u, n: u * _multiplier(n, rules), updates,
                        flatten_names(updates))

  return optax.stateless(scale)


def make_optimizer(c: ml_collections.ConfigDict, params: Any,
                   total_steps: int) -> optax.GradientTransformation:
  """The optax transformation described in the module docstring, from `c` = config.optim.

  Args:
    c: config.optim.
    params: the parameter pytree (e.g. nnx.State of nnx.Param); only its names are read,
      to check that every regex matches some parameter.
    total_steps: number of optimizer updates in the run (for the schedule).

  Returns:
    An optax.GradientTransformation over pytrees of `params`' structure (leaves may be
    nnx.Variables or arrays, so it serves nnx.Optimizer).
  """
  rules = parse_lr_mults(c.lr_mults)
  names = jax.tree.leaves(flatten_names(params))
  for pattern, _ in rules:
    if not any(re.fullmatch(pattern, n) for n in names):
      raise ValueError(f"config.optim.lr_mults regex {pattern!r} matches no parameter; "
                       f"names look like {names[:3]}")
  if c.weight_decay > 0 and not any(re.fullmatch(c.wd_regex, n) for n in names):
    raise ValueError(f"config.optim.wd_regex {c.wd_regex!r} matches no parameter; names "
                     f"look like {names[:3]}")
  if c.grad_accum_steps < 1:
    raise ValueError(f"config.optim.grad_accum_steps must be >= 1, got {c.grad_accum_steps}")

  def decay_mask(tree):
    return jax.tree.map(lambda n: re.fullmatch(c.wd_regex, n) is not None,
                        flatten_names(tree))

  def labels(tree):
    return jax.tree.map(lambda n: _FROZEN if _multiplier(n, rules) == 0 else _TRAIN,
                        flatten_names(tree))

  parts = []
  if c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  parts.append(_direction(c))
  if c.weight_decay > 0:
    parts.append(optax.add_decayed_weights(c.weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(make_schedule(c, total_steps)))
  if any(m != 1.0 for _, m in rules):
    parts.append(_scale_by_multipliers(rules))
  train = optax.chain(*parts)
  if c.grad_accum_steps > 1:
    train = optax.MultiSteps(train, c.grad_accum_steps).gradient_transformation()
  return optax.multi_transform({_TRAIN: train, _FROZEN: optax.set_to_zero()}, labels)
