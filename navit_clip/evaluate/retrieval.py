"""Image-text retrieval: image->text and text->image recall@K, several captions per image.

Scores are cosine similarities of the L2-normalised embeddings. An image counts as
retrieved at K when any of its captions is among its K best-scoring texts; a caption when
its image is among its K best-scoring images (the COCO / Flickr30k protocol). Ties keep
the lower index first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from navit_clip.evaluate.embedder import Embedder, as_embedder, embed_packed
from navit_clip.text.tokenizer import Tokenizer

KS = (1, 5, 10)
_BLOCK = 1024  # score rows computed at once, to bound memory at _BLOCK * max(N, C)


def _first_hit_ranks(queries: np.ndarray, keys: np.ndarray, hit) -> np.ndarray:
  """int [Q]: for each query, the rank of its first relevant key (stable descending order).

  `hit(q_indices [b], ranked_keys [b, K]) -> bool [b, K]` says which keys are relevant.
  """
  ranks = []
  for start in range(0, len(queries), _BLOCK):
    scores = queries[start:start + _BLOCK] @ keys.T
    ranked = np.argsort(-scores, axis=1, kind="stable")
    relevant = hit(np.arange(start, start + len(scores)), ranked)
    ranks.append(np.argmax(relevant, axis=1))
  return np.concatenate(ranks)


def recall_at_k(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                text_image: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
  """Retrieval recall in both directions.

  Args:
    image_embeddings: float32 [N, D], L2-normalised.
    text_embeddings: float32 [C, D], L2-normalised.
    text_image: int [C], the index in [0, N) of each text's image; every image needs at
      least one text.
    ks: the K of recall@K.

  Returns:
    {"i2t_r@K": float, "t2i_r@K": float for each K, "num_images": N, "num_texts": C}.
  """
  text_image = np.asarray(text_image, np.int64)
  n = len(image_embeddings)
  if text_image.shape != (len(text_embeddings),):
    raise ValueError(f"text_image must be [{len(text_embeddings)}], got {text_image.shape}")
  if n == 0 or np.any((text_image < 0) | (text_image >= n)):
    raise ValueError(f"text_image must index the {n} images")
  if len(np.unique(text_image)) != n:
    raise ValueError("every image needs at least one caption for image->text recall")
  i2t = _first_hit_ranks(image_embeddings, text_embeddings,
                         lambda q, ranked: text_image[ranked] == q[:, None])
  t2i = _first_hit_ranks(text_embeddings, image_embeddings,
                         lambda q, ranked: ranked == text_image[q][:, None])
  out = {}
  for k in ks:
    out[f"i2t_r@{k}"] = float(np.mean(i2t < k))
    out[f"t2i_r@{k}"] = float(np.mean(t2i < k))
  out.update(num_images=int(n), num_texts=int(len(text_image)))
  return out


def evaluate(model: nnx.Module | Embedder, tokenizer: Tokenizer, batches,
             captions: Mapping[int, Sequence[str]], ks: Sequence[int] = KS) -> dict[str, float]:
  """Recall@K of `model` over packed `batches` and each image's captions.

  Args:
    captions: example_id -> its captions. Images without a caption are left out; captions
      of images that never reached a batch (skipped as unreadable) too.
  """
  embedder = as_embedder(model)
  embedded = embed_packed(embedder, batches)
  ids = embedded["example_id"]
  keep = np.array([len(captions.get(int(i), ())) > 0 for i in ids], bool)
  ids, image_emb = ids[keep], embedded["embedding"][keep]
  texts, text_image = [], []
  for j, i in enumerate(ids):
    for caption in captions[int(i)]:
      texts.append(caption)
      text_image.append(j)
  if not texts:
    raise ValueError("retrieval found no captions for the embedded images")
  text_emb = embedder.texts(tokenizer.encode(texts))
  return recall_at_k(image_emb, text_emb, np.asarray(text_image), ks)
