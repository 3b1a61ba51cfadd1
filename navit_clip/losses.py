"""Contrastive and classification losses over the valid image slots of a packed batch.

A packed batch has B rows of at most M image slots; `valid` [B, M] bool (the batch's
`image_mask`) says which slots hold an image. Every loss flattens the slots to N = B * M
and ignores empty ones completely: whatever an empty slot holds (even NaN or inf) changes
neither the loss nor any gradient, so a batch with empty slots gives exactly the loss and
gradients of the same pairs packed densely. Means are over the valid slots; a batch with
no valid slot has loss 0.

Contrastive losses take image and text embeddings that the caller has already
L2-normalised (the two-tower model does it, so the same embeddings serve zero-shot
classification and retrieval), the learned log-temperature t' (t = exp(t')) and an
optional bias b: logits_ij = t * <img_i, txt_j> + b, and caption j belongs to image j.
Logits and losses are float32 whatever the input dtype. Every loss returns
(loss, metrics): a float32 scalar and a dict of float32 scalars. `max_logit_scale` is the
ceiling the trainer clamps t' to after every update (CLIP's t <= 100; SigLIP's t is free).

`contrastive_loss_fn(name, chunked=...)` and `classification_loss_fn(name)` choose a loss
once, when the model is built (the model holds it). With `chunked=True` a contrastive loss
runs across the devices of the current mesh without the global [N, N] logits
(navit_clip.chunked_loss): the same value and gradients, less memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from navit_clip import chunked_loss
from navit_clip.choices import check_choice, check_range

CONTRASTIVE_LOSSES = ("sigmoid", "softmax")
CLASSIFICATION_LOSSES = ("sigmoid_xent", "softmax_xent")
LOSSES = CONTRASTIVE_LOSSES + CLASSIFICATION_LOSSES


def check_config(loss: ml_collections.ConfigDict) -> None:
  """Checks config.loss; raises ValueError naming the key."""
  check_choice("config.loss.name", loss.name, LOSSES)
  if loss.chunked and loss.name not in CONTRASTIVE_LOSSES:
    raise ValueError(f"config.loss.chunked applies to the contrastive losses "
                     f"{list(CONTRASTIVE_LOSSES)}, not {loss.name!r}")
  if loss.init_t is not None:
    check_range("config.loss.init_t", loss.init_t, 0.0, low_open=True)
  if loss.init_b is not None and loss.name != "sigmoid":
    raise ValueError(f"config.loss.init_b = {loss.init_b} is set but loss {loss.name!r} "
                     "has no bias")
  if loss.max_t is not None:
    _check_max_t(loss)


def _check_max_t(loss: ml_collections.ConfigDict) -> None:
  """config.loss.max_t: >= 0, a contrastive loss, and not below the initial temperature."""
  check_range("config.loss.max_t", loss.max_t, 0.0)
  if loss.name not in CONTRASTIVE_LOSSES:
    raise ValueError(f"config.loss.max_t applies to the contrastive losses "
                     f"{list(CONTRASTIVE_LOSSES)}, not {loss.name!r}")
  init_t = _INIT_T[loss.name] if loss.init_t is None else loss.init_t
  if loss.max_t and init_t > loss.max_t:
    raise ValueError(f"config.loss.max_t = {loss.max_t} is below the initial temperature "
                     f"t = {init_t:g} (config.loss.init_t)")

# Initial temperature t and bias b of each contrastive loss (SigLIP; CLIP has no bias).
_INIT_T = {"sigmoid": 10.0, "softmax": 1.0 / 0.07}
_INIT_B = {"sigmoid": -10.0, "softmax": None}
# The most t may reach: CLIP clamps it at 100 after every update (a larger t makes the
# softmax unstable); SigLIP leaves it free.
_MAX_T = {"sigmoid": 0.0, "softmax": 100.0}

# Logit given to masked-out entries of a softmax: finite, so that a fully masked row gives
# finite values and gradients (an -inf row would give NaN).
_MASKED_LOGIT = -1e9


def init_logit_params(name: str, init_t: float | None = None,
                      init_b: float | None = None) -> tuple[float, float | None]:
  """Initial (t', b) of contrastive loss `name`, where t = exp(t').

  Defaults: sigmoid t = 10, b = -10 (SigLIP); softmax t = 1 / 0.07 and no bias (CLIP).
  `init_t` / `init_b` override them; b is None when the loss has no bias.
  """
  if name not in CONTRASTIVE_LOSSES:
    raise ValueError(f"unknown contrastive loss {name!r}; expected one of "
                     f"{list(CONTRASTIVE_LOSSES)}")
  t = _INIT_T[name] if init_t is None else init_t
  if not t > 0:
    raise ValueError(f"initial temperature must be > 0, got {t}")
  if name == "softmax" and init_b is not None:
    raise ValueError("the softmax loss has no bias (a shift of every logit changes no "
                     f"softmax), got init_b = {init_b}")
  b = _INIT_B[name] if init_b is None else init_b
  return math.log(t), b


def max_logit_scale(loss: ml_collections.ConfigDict) -> float | None:
  """The ceiling of t' = log t that the train step clamps t' to after every update.

  `loss` is config.loss: log(max_t) where max_t > 0 (None: 100 for softmax as in CLIP, no
  ceiling for sigmoid as in SigLIP); None for max_t = 0 and for classification losses.
  """
  if loss.name not in CONTRASTIVE_LOSSES:
    return None
  max_t = _MAX_T[loss.name] if loss.max_t is None else loss.max_t
  return math.log(max_t) if max_t > 0 else None


def _check_valid(valid: jax.Array, name: str, x: jax.Array, extra_dims: int) -> None:
  if valid.ndim != 2 or valid.dtype != jnp.bool_:
    raise ValueError(f"valid must be bool [B, M], got {valid.dtype}{list(valid.shape)}")
  if x.ndim != 2 + extra_dims or x.shape[:2] != valid.shape:
    want = "[B, M" + ", ..." * extra_dims + "]"
    raise ValueError(f"{name} must be {want} with [B, M] = {list(valid.shape)}, got "
                     f"{list(x.shape)}")


def _flat_valid(x: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, M, ...] -> [N, ...] with empty slots set to zero (their gradient is zero)."""
  x = x.reshape(valid.size, *x.shape[2:])
  v = valid.reshape(-1)
  return jnp.where(v.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.zeros((), x.dtype))


def _flat_pair(valid: jax.Array, a_name: str, a: jax.Array, b_name: str,
               b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[B, M, D] `a` and `b` of one shape -> float32 [N, D] each, zero in empty slots."""
  if a.shape != b.shape:
    raise ValueError(f"{a_name} and {b_name} differ in shape: {list(a.shape)} vs "
                     f"{list(b.shape)}")
  return _flat_valid(a.astype(jnp.float32), valid), _flat_valid(b.astype(jnp.float32), valid)


def _scalar(name: str, x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.size != 1:
    raise ValueError(f"{name} must be a scalar (or hold one value), got shape {list(x.shape)}")
  return x.reshape(())


def _masked_mean(per_slot: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean of [N] values over the valid slots, and the valid count (float32)."""
  n = jnp.sum(v, dtype=jnp.float32)
  return jnp.sum(jnp.where(v, per_slot, 0.0)) / jnp.maximum(n, 1.0), n


def _contrastive_inputs(img, txt, valid, logit_scale, logit_bias):
  """Checked, flattened inputs of a contrastive loss.

  Returns float32 [N, D] image and text embeddings (zero in empty slots), the bool [N]
  slot mask, t = exp(logit_scale), b (None without bias) and the metrics t, b.
  """
  _check_valid(valid, "img", img, 1)
  _check_valid(valid, "txt", txt, 1)
  x, y = _flat_pair(valid, "img", img, "txt embeddings", txt)
  t = jnp.exp(_scalar("logit_scale", logit_scale))
  metrics = {"t": t}
  b = None
  if logit_bias is not None:
    b = metrics["b"] = _scalar("logit_bias", logit_bias)
  return x, y, valid.reshape(-1), t, b, metrics


def _contrastive_logits(x, y, t, b):
  """The global [N, N] float32 logits t * x_i . y_j (+ b)."""
  logits = t * (x @ y.T)
  return logits if b is None else logits + b


def sigmoid_loss(img: jax.Array, txt: jax.Array, valid: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array | None = None, *,
                 chunked: bool = False) -> tuple[jax.Array, dict]:
  """SigLIP loss over the valid pairs.

  loss = -(1 / n) sum_{i, j valid} log sigmoid(z_ij * (t * x_i . y_j + b)), with z_ij = 1
  if i = j else -1 and n the number of valid slots.

  Args:
    img: [B, M, D] L2-normalised image embeddings, any float dtype.
    txt: [B, M, D] L2-normalised text embeddings, the caption of each image slot.
    valid: [B, M] bool, the slots that hold an image.
    logit_scale: scalar t' (t = exp(t')).
    logit_bias: scalar b, or None for no bias.
    chunked: pass the texts round the ring of devices of the current mesh
      (chunked_loss.ring_sigmoid_loss) instead of building the global logits.

  Returns:
    (loss, metrics): float32 scalar; metrics "t", "b" (when given), "n_valid".
  """
  x, y, v, t, b, metrics = _contrastive_inputs(img, txt, valid, logit_scale, logit_bias)
  if chunked:
    bias = jnp.zeros((), jnp.float32) if b is None else b
    loss, metrics["n_valid"] = chunked_loss.ring_sigmoid_loss(x, y, v, t, bias)
    return loss, metrics
  logits = _contrastive_logits(x, y, t, b)
  z = 2.0 * jnp.eye(v.size, dtype=jnp.float32) - 1.0
  pairs = v[:, None] & v[None, :]
  nll = jnp.where(pairs, -jax.nn.log_sigmoid(z * logits), 0.0)
  loss, metrics["n_valid"] = _masked_mean(jnp.sum(nll, axis=1), v)
  return loss, metrics


def softmax_loss(img: jax.Array, txt: jax.Array, valid: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array | None = None, *,
                 chunked: bool = False) -> tuple[jax.Array, dict]:
  """CLIP loss: mean of the image->text and text->image cross-entropies over valid pairs.

  Empty slots are masked out of every softmax (as candidates) and out of the mean (as
  queries). Arguments and return value as in `sigmoid_loss`; a bias shifts every logit
  and so changes nothing. `chunked`: pass images and texts round the ring of devices of
  the current mesh (chunked_loss.ring_softmax_loss) instead of building the global logits.
  """
  x, y, v, t, b, metrics = _contrastive_inputs(img, txt, valid, logit_scale, logit_bias)
  if chunked:
    loss, metrics["n_valid"] = chunked_loss.ring_softmax_loss(
        x, y, v, t, masked_logit=_MASKED_LOGIT)
    return loss, metrics
  logits = _contrastive_logits(x, y, t, b)
  img_to_txt = jax.nn.log_softmax(jnp.where(v[None, :], logits, _MASKED_LOGIT), axis=1)
  txt_to_img = jax.nn.log_softmax(jnp.where(v[:, None], logits, _MASKED_LOGIT), axis=0)
  nll = -0.5 * (jnp.diagonal(img_to_txt) + jnp.diagonal(txt_to_img))
  loss, metrics["n_valid"] = _masked_mean(nll, v)
  return loss, metrics


def sigmoid_xent_loss(logits: jax.Array, labels: jax.Array,
                      valid: jax.Array) -> tuple[jax.Array, dict]:
  """Multi-label sigmoid cross-entropy (JFT-style): per slot, summed over classes.

  Args:
    logits: [B, M, K] classifier logits, any float dtype.
    labels: [B, M, K] multi-hot (or soft) targets in [0, 1].
    valid: [B, M] bool, the slots that hold an image.

  Returns:
    (loss, metrics): the mean over valid slots of the per-slot sum over classes;
    metrics "prec@1" (mean label of the top-1 class: for multi-hot labels, how often
    the top-1 class is a positive) and "n_valid".
  """
  _check_valid(valid, "logits", logits, 1)
  x, y = _flat_pair(valid, "logits", logits, "multi-hot labels", labels)
  v = valid.reshape(-1)
  nll = -(y * jax.nn.log_sigmoid(x) + (1.0 - y) * jax.nn.log_sigmoid(-x))
  loss, n = _masked_mean(jnp.sum(nll, axis=1), v)
  top1 = jnp.take_along_axis(y, jnp.argmax(x, axis=1)[:, None], axis=1)[:, 0]
  prec1, _ = _masked_mean(top1, v)
  return loss, {"prec@1": prec1, "n_valid": n}


def softmax_xent_loss(logits: jax.Array, labels: jax.Array,
                      valid: jax.Array) -> tuple[jax.Array, dict]:
  """Single-label softmax cross-entropy.

  Args:
    logits: [B, M, K] classifier logits, any float dtype.
    labels: [B, M] integer class ids in [0, K) in valid slots (anything in empty ones).
    valid: [B, M] bool, the slots that hold an image.

  Returns:
    (loss, metrics): mean over valid slots; metrics "accuracy" (top-1) and "n_valid".
  """
  _check_valid(valid, "logits", logits, 1)
  if labels.shape != valid.shape or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"class labels must be integer [B, M] = {list(valid.shape)}, got "
                     f"{labels.dtype}{list(labels.shape)}")
  x = _flat_valid(logits.astype(jnp.float32), valid)
  y = _flat_valid(labels, valid)
  v = valid.reshape(-1)
  logp = jax.nn.log_softmax(x, axis=1)
  nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  loss, n = _masked_mean(nll, v)
  correct = (jnp.argmax(x, axis=1) == y).astype(jnp.float32)
  accuracy, _ = _masked_mean(correct, v)
  return loss, {"accuracy": accuracy, "n_valid": n}


# A loss chosen at build time: contrastive (img, txt, valid, logit_scale, logit_bias=None)
# or classification (logits, labels, valid) -> (loss, metrics).
LossFn = Callable[..., tuple[jax.Array, dict]]

# Every contrastive loss, dense and chunked, built once: the same choice gives the same
# function object (so a model holding it equals its rebuild).
_CONTRASTIVE: dict[tuple[str, bool], LossFn] = {
    (name, chunked): functools.partial(fn, chunked=chunked)
    for name, fn in (("sigmoid", sigmoid_loss), ("softmax", softmax_loss))
    for chunked in (False, True)}
_CLASSIFICATION: dict[str, LossFn] = {"sigmoid_xent": sigmoid_xent_loss,
                                      "softmax_xent": softmax_xent_loss}


def contrastive_loss_fn(name: str, *, chunked: bool = False) -> LossFn:
  """The contrastive loss `name` ("sigmoid" | "softmax"), dense or chunked.

  Returns `sigmoid_loss` or `softmax_loss` with `chunked` bound: (img, txt, valid,
  logit_scale, logit_bias=None) -> (loss, metrics). Chunked, it computes the same loss
  across the devices of the mesh set when it is traced (`jax.set_mesh`).
  """
  if name not in CONTRASTIVE_LOSSES:
    raise ValueError(f"unknown contrastive loss {name!r}; expected one of "
                     f"{list(CONTRASTIVE_LOSSES)}")
  return _CONTRASTIVE[name, bool(chunked)]


def classification_loss_fn(name: str) -> LossFn:
  """The classification loss `name` ("sigmoid_xent" | "softmax_xent").

  Returns `sigmoid_xent_loss` or `softmax_xent_loss`: (logits, labels, valid) ->
  (loss, metrics).
  """
  if name not in _CLASSIFICATION:
    raise ValueError(f"unknown classification loss {name!r}; expected one of "
                     f"{list(_CLASSIFICATION)}")
  return _CLASSIFICATION[name]
