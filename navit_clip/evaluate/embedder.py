"""Embedding images (packed batches, keyed by example id) and texts with a trained model."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from navit_clip.data.batch import device_fields

TEXT_BATCH = 256  # texts per compiled call; the last call is padded to it


class Embedder:
  """The jitted `embed_images` / `embed_texts` of one model, compiled once per input shape."""

  def __init__(self, model: nnx.Module):
    graphdef, self._state = nnx.split(model)
    self._images = jax.jit(lambda s, b: nnx.merge(graphdef, s).embed_images(b)[0])
    self._texts = jax.jit(lambda s, t: nnx.merge(graphdef, s).embed_texts(t))

  def images(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Packed batch -> L2-normalised float32 [B, M, D] (zero in empty slots)."""
    device_batch = device_fields(batch, drop=("labels",))  # embedding reads no labels
    return np.asarray(self._images(self._state, device_batch))

  def texts(self, tokens: np.ndarray, batch_size: int = TEXT_BATCH) -> np.ndarray:
    """int32 [N, T] -> L2-normalised float32 [N, D], in calls of `batch_size` rows."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or not len(tokens):
      raise ValueError(f"text tokens must be a non-empty int32 [N, T], got {tokens.shape}")
    n = len(tokens)
    size = min(batch_size, n)
    padded = np.zeros((-(-n // size) * size, tokens.shape[1]), np.int32)
    padded[:n] = tokens
    out = [np.asarray(self._texts(self._state, padded[i:i + size]))
           for i in range(0, len(padded), size)]
    return np.concatenate(out)[:n]


def as_embedder(model: nnx.Module | Embedder) -> Embedder:
  return model if isinstance(model, Embedder) else Embedder(model)


def embed_packed(model: nnx.Module | Embedder, batches: Iterable[Mapping[str, np.ndarray]],
                 extra_fields: tuple[str, ...] = (),
                 timing: dict[str, float] | None = None) -> dict[str, np.ndarray]:
  """Runs `model.embed_images` over `batches` and gathers the valid slots.

  One compile for the whole stream (every batch has the same spec).

  Args:
    timing: if given, receives "model_s" (seconds in the model, the first, compiling,
      batch excluded) and "timed_images" (the images of the timed batches).

  Returns:
    {"example_id": int64 [N], "embedding": float32 [N, D], plus each of `extra_fields`
    ([N, ...] per slot, e.g. "labels")}, sorted by example id.
  """
  embedder = as_embedder(model)
  out = {"example_id": [], "embedding": [], **{f: [] for f in extra_fields}}
  model_s, timed_images = 0.0, 0
  for i, batch in enumerate(batches):
    t0 = time.perf_counter()
    emb = embedder.images(batch)
    mask = batch["image_mask"]
    if i > 0:
      model_s += time.perf_counter() - t0
      timed_images += int(mask.sum())
    out["example_id"].append(batch["example_id"][mask])
    out["embedding"].append(emb[mask])
    for f in extra_fields:
      out[f].append(batch[f][mask])
  if not out["example_id"]:
    raise ValueError("embed_packed got no batches")
  if timing is not None:
    timing.update(model_s=model_s, timed_images=timed_images)
  out = {k: np.concatenate(v) for k, v in out.items()}
  order = np.argsort(out["example_id"], kind="stable")
  return {k: v[order] for k, v in out.items()}
