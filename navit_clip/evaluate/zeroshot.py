"""Zero-shot classification: class names x prompt templates -> a text classifier.

Each class's prompts ("a photo of a {}.", ...) are embedded, averaged and renormalised
(the CLIP recipe); an image is assigned the class whose embedding is nearest in cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx

from navit_clip.evaluate.embedder import Embedder, as_embedder, embed_packed
from navit_clip.text.tokenizer import Tokenizer


def class_embeddings(model: nnx.Module | Embedder, tokenizer: Tokenizer,
                     classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """float32 [K, D]: per class, the renormalised mean of its templates' text embeddings."""
  if not classnames or not templates:
    raise ValueError("zero-shot needs at least one class name and one template")
  for t in templates:
    if "{}" not in t:
      raise ValueError(f"zero-shot template {t!r} has no '{{}}' placeholder")
  tokens = tokenizer.encode([t.format(c) for c in classnames for t in templates])
  emb = as_embedder(model).texts(tokens)
  emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
  norm = np.linalg.norm(emb, axis=-1, keepdims=True)
  return (emb / np.maximum(norm, 1e-6)).astype(np.float32)


def accuracy(image_embeddings: np.ndarray, labels: np.ndarray,
             classifier: np.ndarray, k: int = 5) -> dict[str, float | list[float]]:
  """Top-1, top-k and per-class top-1 accuracy.

  Args:
    image_embeddings: float32 [N, D], L2-normalised.
    labels: int [N] in [0, K).
    classifier: float32 [K, D] from `class_embeddings`.
  """
  num_classes = classifier.shape[0]
  scores = image_embeddings @ classifier.T
  ranked = np.argsort(-scores, axis=1)
  top1 = ranked[:, 0] == labels
  topk = (ranked[:, :min(k, num_classes)] == labels[:, None]).any(axis=1)
  per_class = [float(top1[labels == c].mean()) if (labels == c).any() else float("nan")
               for c in range(num_classes)]
  return {"top1": float(top1.mean()), f"top{k}": float(topk.mean()),
          "per_class_top1": per_class, "num_images": int(len(labels)),
          "chance": 1.0 / num_classes}


def evaluate(model: nnx.Module | Embedder, tokenizer: Tokenizer, batches,
             classnames: Sequence[str],
             templates: Sequence[str]) -> dict[str, float | list[float]]:
  """Zero-shot accuracy of `model` over packed `batches` whose "labels" index `classnames`."""
  embedder = as_embedder(model)
  embedded = embed_packed(embedder, batches, extra_fields=("labels",))
  classifier = class_embeddings(embedder, tokenizer, classnames, templates)
  return accuracy(embedded["embedding"], embedded["labels"], classifier)
