"""Embedding every image of a finite stream of packed batches, keyed by example id."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx


def embed_packed(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]],
                 extra_fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Runs `model.embed_images` over `batches` and gathers the valid slots.

  One compile for the whole stream (every batch has the same spec).

  Returns:
    {"example_id": int64 [N], "embedding": float32 [N, D], plus each of `extra_fields`
    ([N, ...] per slot, e.g. "labels")}, sorted by example id.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def embed(state, batch):
    return nnx.merge(graphdef, state).embed_images(batch)[0]

  out = {"example_id": [], "embedding": [], **{f: [] for f in extra_fields}}
  for batch in batches:
    device_batch = {k: v for k, v in batch.items() if k != "example_id"}
    emb = np.asarray(embed(state, device_batch))
    mask = batch["image_mask"]
    out["example_id"].append(batch["example_id"][mask])
    out["embedding"].append(emb[mask])
    for f in extra_fields:
      out[f].append(batch[f][mask])
  if not out["example_id"]:
    raise ValueError("embed_packed got no batches")
  out = {k: np.concatenate(v) for k, v in out.items()}
  order = np.argsort(out["example_id"], kind="stable")
  return {k: v[order] for k, v in out.items()}
