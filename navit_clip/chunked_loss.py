"""Contrastive losses computed across the devices of the mesh, without the global logits.

Both run under `jax.shard_map` over the batch axes ("data", "fsdp") of the current mesh
(`jax.set_mesh`); each device holds n = N / devices image and text embeddings (its rows of
the batch) and never builds the global [N, N] logits. Embeddings travel round the ring of
devices (`ppermute`); at each of the `devices` steps a device scores what it holds against
what came round, an [n, n] block, and the blocks are rematerialised in the backward pass,
so a device keeps O(n^2 + N * D) values instead of O(N^2) (or O(N^2 / devices) when the
compiler partitions the dense loss by rows):

  ring_sigmoid_loss  SigLIP's chunked sigmoid loss: the texts go round; each block adds
                     its pair losses.
  ring_softmax_loss  CLIP's loss: images and texts go round; each block adds to the
                     running log-normalisers (logsumexp) of the device's images and texts.
                     (Gathering all embeddings with [n, N] logits per device, open_clip's
                     local loss, needs O(N^2 / devices): no less than the compiler's
                     row-partitioned dense loss.)

Inputs are the flattened slots of losses.py (empty slots already zeroed, `valid` saying
which are real); the loss is the sum over valid slots, normalised by the global number of
valid slots, exactly as the dense losses in navit_clip.losses. Values and gradients equal
the dense ones up to float32 summation order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from navit_clip.activation_sharding import BATCH_AXES


def _batch_axes(n_rows: int) -> tuple[tuple[str, ...], int]:
  """The batch axes of the current mesh and the number of devices along them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("chunked contrastive losses run across the devices of the current "
                     "mesh; call them under jax.set_mesh(mesh)")
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"the current mesh {dict(mesh.shape)} has none of the batch axes "
                     f"{list(BATCH_AXES)}")
  devices = math.prod(mesh.shape[a] for a in axes)
  if n_rows % devices:
    raise ValueError(f"{n_rows} embedding slots do not split evenly over the "
                     f"{devices} devices of the batch axes {axes}")
  return axes, devices


def _sigmoid_block(x, y, vx, vy, t, b, diagonal: bool):
  """Sum of -log sigmoid(z * (t x.y + b)) over the valid pairs of one [n, n] block.

  z = +1 on the diagonal of the device's own block (its image-caption pairs), else -1.
  """
  logits = t * (x @ y.T) + b
  if diagonal:
    z = 2.0 * jnp.eye(x.shape[0], dtype=jnp.float32) - 1.0
  else:
    z = -1.0
  pairs = (vx[:, None] > 0) & (vy[None, :] > 0)
  return jnp.sum(jnp.where(pairs, -jax.nn.log_sigmoid(z * logits), 0.0))


_own_block = jax.checkpoint(functools.partial(_sigmoid_block, diagonal=True))
_other_block = jax.checkpoint(functools.partial(_sigmoid_block, diagonal=False))


def ring_sigmoid_loss(x: jax.Array, y: jax.Array, valid: jax.Array, t: jax.Array,
                      b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """SigLIP loss with the texts passed round the ring of devices.

  Args:
    x: float32 [N, D] image embeddings, zero in empty slots; rows split over the batch axes.
    y: float32 [N, D] text embeddings, caption j of image j, zero in empty slots.
    valid: bool [N], the slots that hold an image.
    t: float32 scalar temperature (not its log).
    b: float32 scalar bias (0 for none).

  Returns:
    (loss, n_valid): float32 scalars, the sum of the pair losses over valid pairs divided by
    the number of valid slots (loss 0 when there is none), and that number.
  """
  axes, devices = _batch_axes(x.shape[0])
  ring = [(i, (i + 1) % devices) for i in range(devices)]

  def local(x, y, v, t, b):
    v = v.astype(jnp.float32)
    total = _own_block(x, y, v, v, t, b)

    def step(_, carry):
      y_k, v_k, total = carry
      y_k = jax.lax.ppermute(y_k, axes, ring)
      v_k = jax.lax.ppermute(v_k, axes, ring)
      return y_k, v_k, total + _other_block(x, y_k, v, v_k, t, b)

    _, _, total = jax.lax.fori_loop(1, devices, step, (y, v, total))
    total = jax.lax.psum(total, axes)
    n_valid = jax.lax.psum(jnp.sum(v), axes)
    return total / jnp.maximum(n_valid, 1.0), n_valid

  rows = PartitionSpec(axes)
  return jax.shard_map(local, in_specs=(rows, rows, rows, PartitionSpec(), PartitionSpec()),
                       out_specs=(PartitionSpec(), PartitionSpec()))(x, y, valid, t, b)


def _log_normaliser(q, k, vk, t, masked_logit: float):
  """logsumexp_j (t q_i . k_j) over the valid columns of one [n, n] block: [n]."""
  logits = jnp.where(vk[None, :] > 0, t * (q @ k.T), masked_logit)
  return jax.nn.logsumexp(logits, axis=1)


def ring_softmax_loss(x: jax.Array, y: jax.Array, valid: jax.Array, t: jax.Array, *,
                      masked_logit: float) -> tuple[jax.Array, jax.Array]:
  """CLIP loss with images and texts passed round the ring of devices.

  Per valid slot i: -(log softmax_j(t x_i.y_j)[i] + log softmax_j(t y_i.x_j)[i]) / 2, the
  softmaxes over valid slots j only (empty ones get `masked_logit`, a finite value, so that
  nothing turns NaN). Each device accumulates the log-normalisers of its images and its
  texts block by block as the other devices' texts and images come round. Arguments as in
  `ring_sigmoid_loss`, without a bias (a shift of every logit changes no softmax).

  Returns:
    (loss, n_valid): the mean over valid slots, and their number.
  """
  axes, devices = _batch_axes(x.shape[0])
  ring = [(i, (i + 1) % devices) for i in range(devices)]
  block = jax.checkpoint(functools.partial(_log_normaliser, masked_logit=masked_logit))

  def local(x, y, v, t):
    v = v.astype(jnp.float32)
    own_logit = t * jnp.sum(x * y, axis=1)  # each row's positive pair

    def step(_, carry):
      x_k, y_k, v_k, img_lse, txt_lse = carry
      x_k, y_k, v_k = (jax.lax.ppermute(a, axes, ring) for a in (x_k, y_k, v_k))
      return (x_k, y_k, v_k, jnp.logaddexp(img_lse, block(x, y_k, v_k, t)),
              jnp.logaddexp(txt_lse, block(y, x_k, v_k, t)))

    init = (x, y, v, block(x, y, v, t), block(y, x, v, t))
    *_, img_lse, txt_lse = jax.lax.fori_loop(1, devices, step, init)
    nll = 0.5 * (img_lse + txt_lse) - own_logit
    total = jax.lax.psum(jnp.sum(jnp.where(v > 0, nll, 0.0)), axes)
    n_valid = jax.lax.psum(jnp.sum(v), axes)
    return total / jnp.maximum(n_valid, 1.0), n_valid

  rows = PartitionSpec(axes)
  return jax.shard_map(local, in_specs=(rows, rows, rows, PartitionSpec()),
                       out_specs=(PartitionSpec(), PartitionSpec()))(x, y, valid, t)
