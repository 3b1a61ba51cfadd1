"""Validation metrics of a classification model from its logits on a labelled eval set.

Single-label (softmax): top-1 and top-k accuracy and the mean softmax cross-entropy.
Multi-label (sigmoid, JFT-style multi-hot labels): precision@1 (the share of images whose
highest-scoring class is one of their labels), mAP (the mean over classes with at least one
positive image of the average precision of the images ranked by that class's logit) and the
mean sigmoid cross-entropy summed over classes. Logits are one row per image: gather the
valid slots of packed batches first (`logits[batch["image_mask"]]`); `evaluate` does that
for a classification model over packed labelled batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from navit_clip.data.batch import device_fields


def _check(logits: np.ndarray, labels: np.ndarray, multi_label: bool) -> None:
  want = "float [N, K] multi-hot" if multi_label else "int [N]"
  shape_ok = labels.shape == (logits.shape if multi_label else logits.shape[:1])
  if logits.ndim != 2 or not len(logits) or not shape_ok:
    raise ValueError(f"classification metrics need logits [N, K], N >= 1, and labels {want}; "
                     f"got logits {list(logits.shape)} and labels {list(labels.shape)}")
  if not multi_label and (labels.dtype.kind not in "iu" or labels.min() < 0
                          or labels.max() >= logits.shape[1]):
    raise ValueError(f"labels must be class indices in [0, {logits.shape[1]})")


def softmax_metrics(logits: np.ndarray, labels: np.ndarray,
                    k: int = 5) -> dict[str, float | int]:
  """{"top1", f"top{k}", "loss", "num_images"} of logits [N, K] against int labels [N].

  A tie at the k-th place counts the lower class index first (a stable sort).
  """
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  _check(logits, labels, multi_label=False)
  ranked = np.argsort(-logits, axis=1, kind="stable")
  top1 = ranked[:, 0] == labels
  topk = (ranked[:, :min(k, logits.shape[1])] == labels[:, None]).any(axis=1)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = -log_probs[np.arange(len(labels)), labels]
  return {"top1": float(top1.mean()), f"top{k}": float(topk.mean()),
          "loss": float(loss.mean()), "num_images": int(len(labels))}


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
  """AP of one class: the mean, over its positive images, of the precision among the
  images ranked at or above each (scores [N] descending, ties in index order)."""
  order = np.argsort(-scores, kind="stable")
  hits = positives[order].astype(bool)
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(precision[hits].mean())


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
  """{"prec1", "map", "loss", "num_images", "map_classes"} of logits [N, K] against
  multi-hot labels [N, K] (1 = the image has that class); "map_classes" is the number of
  classes with a positive image, over which mAP averages."""
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  _check(logits, labels, multi_label=True)
  positive = labels > 0.5
  prec1 = positive[np.arange(len(logits)), np.argmax(logits, axis=1)]
  classes = np.flatnonzero(positive.any(axis=0))
  aps = [average_precision(logits[:, c], positive[:, c]) for c in classes]
  # sigmoid cross-entropy, stably: max(x, 0) - x y + log(1 + exp(-|x|))
  xent = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
  return {"prec1": float(prec1.mean()), "map": float(np.mean(aps)) if aps else float("nan"),
          "loss": float(xent.sum(axis=1).mean()), "num_images": int(len(logits)),
          "map_classes": int(len(classes))}


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           multi_label: bool) -> dict[str, float | int]:
  """`multilabel_metrics` when `multi_label` (sigmoid models), else `softmax_metrics`."""
  if multi_label:
    return multilabel_metrics(logits, labels)
  return softmax_metrics(logits, labels)


def model_logits(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(logits float32 [N, K], labels [N] or [N, K]) of the valid slots of packed `batches`.

  `model(batch)` -> (logits [B, M, K], image_mask [B, M]) (navit_clip.model.Classifier),
  compiled once for the stream (every batch has the same spec).
  """
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b)[0])
  logits, labels = [], []
  for batch in batches:
    out = np.asarray(forward(state, device_fields(batch, drop=("labels",))))
    mask = batch["image_mask"]
    logits.append(out[mask])
    labels.append(batch["labels"][mask])
  if not logits:
    raise ValueError("classification evaluation got no batches")
  return np.concatenate(logits), np.concatenate(labels)


def evaluate(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]],
             multi_label: bool) -> dict[str, float | int]:
  """`classification_metrics` of `model`'s logits over labelled packed `batches`, plus
  "chance" (single-label: 1 / K, the top-1 of a constant guess)."""
  logits, labels = model_logits(model, batches)
  out = classification_metrics(logits, labels, multi_label)
  if not multi_label:
    out["chance"] = 1.0 / logits.shape[1]
  return out
