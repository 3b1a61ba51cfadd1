"""The models built on the NaViT image tower: a two-tower contrastive model and a classifier.

Both take a packed batch (navit_clip.data.batch) and keep everything per image slot:
embeddings and logits are [B, M, ...] beside the slot mask `image_mask` [B, M].

Both split their loss in two, `loss(batch) = loss_on_features(features(batch), batch)`:
`features` is the towers' work, row by row (a dict of [B, M, D] arrays: rows may be
embedded in micro-batches and put together), `loss_on_features` the cheap rest over the
whole batch (the contrastive logits against every row; the classification head). The
trainer's full-batch gradient accumulation (navit_clip.optim.accumulated_value_and_grad)
differentiates the two parts apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from navit_clip import losses
from navit_clip.choices import check_choice
from navit_clip.image_tower import ImageTower
from navit_clip.text.tower import TextTower

TASKS = ("contrastive", "classification")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks config.task and config.model.num_classes, the model's own keys (the towers
  check config.model.image / .text); raises ValueError naming the key."""
  check_choice("config.task", config.task, TASKS)
  if config.task == "classification" and config.model.num_classes < 1:
    raise ValueError(f"config.model.num_classes = {config.model.num_classes} must be >= 1 "
                     "for classification")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / ||x|| over the last axis, in float32.

  A zero vector (an empty slot) stays zero with a finite gradient: the norm is clamped
  before the square root, not after (d||x||/dx is 0/0 at x = 0).
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTower(nnx.Module):
  """Image tower + text tower in one joint space, with the learned logit scale and bias.

  logits_ij = exp(logit_scale) * <zimg_i, ztxt_j> + logit_bias. The text tower projects to
  the image tower's width, which is the joint embedding dimension. `loss` is the contrastive
  loss that config.loss chose (name, chunked), fixed when the model is built. A loss
  without a bias (softmax: a shift of every logit changes no softmax) has no `logit_bias`
  parameter (the attribute is None).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.image = ImageTower.from_config(config.model.image, rngs=rngs)
    self.text = TextTower.from_config(config.model.text, self.image.width, rngs=rngs)
    t, b = losses.init_logit_params(config.loss.name, config.loss.init_t, config.loss.init_b)
    self.logit_scale = nnx.Param(jnp.asarray(t, jnp.float32))
    self.logit_bias = None if b is None else nnx.Param(jnp.asarray(b, jnp.float32))
    self.loss_fn = losses.contrastive_loss_fn(config.loss.name, chunked=config.loss.chunked)

  def embed_images(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Packed batch -> (L2-normalised float32 [B, M, D], image_mask bool [B, M])."""
    emb, mask = self.image(batch)
    return l2_normalize(emb), mask

  def embed_texts(self, tokens: jax.Array) -> jax.Array:
    """int32 [..., T] -> L2-normalised float32 [..., D]."""
    return l2_normalize(self.text(tokens))

  def __call__(self, batch: Mapping[str, jax.Array]):
    """-> (zimg [B, M, D], ztxt [B, M, D], image_mask [B, M])."""
    zimg, mask = self.embed_images(batch)
    return zimg, self.embed_texts(batch["text_tokens"]), mask

  def features(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Packed batch -> {"img", "txt": L2-normalised float32 [B, M, D]}, row by row."""
    zimg, ztxt, _ = self(batch)
    return {"img": zimg, "txt": ztxt}

  def loss_on_features(self, features: Mapping[str, jax.Array],
                       batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """`features` of all of `batch`'s rows -> (float32 loss [], float32 scalar metrics) of
    `loss_fn`, every caption of the batch a candidate for every image."""
    bias = None if self.logit_bias is None else self.logit_bias[...]
    return self.loss_fn(features["img"], features["txt"], batch["image_mask"].astype(bool),
                        self.logit_scale[...], bias)

  def loss(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Packed batch -> (float32 loss [], metrics of float32 scalars) of `loss_fn`."""
    return self.loss_on_features(self.features(batch), batch)


class Classifier(nnx.Module):
  """Image tower + a Dense head: packed batch -> logits float32 [B, M, K].

  `loss` is the classification loss config.loss.name, fixed when the model is built.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.image = ImageTower.from_config(config.model.image, rngs=rngs)
    k = config.model.num_classes
    if k < 1:
      raise ValueError(f"config.model.num_classes = {k} must be >= 1 for classification")
    self.head = nnx.Linear(self.image.width, k, kernel_init=nnx.initializers.zeros_init(),
                           bias_init=nnx.initializers.constant(config.model.head_bias_init),
                           param_dtype=jnp.float32, rngs=rngs)
    self.loss_fn = losses.classification_loss_fn(config.loss.name)

  def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Packed batch -> (logits float32 [B, M, K], image_mask bool [B, M])."""
    emb, mask = self.image(batch)
    return self._logits(emb), mask

  def _logits(self, emb: jax.Array) -> jax.Array:
    return self.head(emb).astype(jnp.float32)

  def embed_images(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Packed batch -> (the image tower's pooled embeddings before the head, L2-normalised
    float32 [B, M, D]; image_mask bool [B, M]): what few-shot probes and `embed` read."""
    emb, mask = self.image(batch)
    return l2_normalize(emb), mask

  def features(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Packed batch -> {"img": the image tower's pooled embeddings [B, M, D]}, row by row."""
    return {"img": self.image(batch)[0]}

  def loss_on_features(self, features: Mapping[str, jax.Array],
                       batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """`features` of all of `batch`'s rows -> (float32 loss [], float32 scalar metrics)."""
    return self.loss_fn(self._logits(features["img"]), batch["labels"],
                        batch["image_mask"].astype(bool))

  def loss(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Packed batch with labels -> (float32 loss [], metrics of float32 scalars)."""
    return self.loss_on_features(self.features(batch), batch)


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> TwoTower | Classifier:
  """The model that `config.task` trains."""
  if config.task == "contrastive":
    return TwoTower(config, rngs=rngs)
  if config.task == "classification":
    return Classifier(config, rngs=rngs)
  raise ValueError(f"config.task = {config.task!r}; expected one of {list(TASKS)}")
