"""Retrieval recall@K equals a brute-force reference, with several captions per image."""

import numpy as np

from navit_clip.evaluate import retrieval
from navit_clip.evaluate.restore import restore_model
from navit_clip.evaluate.runner import run_all
from navit_clip.config import eval_config


def _normalise(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(images, texts, text_image, k):
  """Recall@k by explicit loops and sorting (ties: the lower index first)."""
  i2t = []
  for i, img in enumerate(images):
    order = sorted(range(len(texts)), key=lambda j: (-float(img @ texts[j]), j))
    i2t.append(any(text_image[j] == i for j in order[:k]))
  t2i = []
  for j, txt in enumerate(texts):
    order = sorted(range(len(images)), key=lambda i: (-float(images[i] @ txt), i))
    t2i.append(text_image[j] in order[:k])
  return float(np.mean(i2t)), float(np.mean(t2i))


def test_recall_matches_brute_force_with_several_captions_per_image():
  rng = np.random.default_rng(0)
  n, dim = 40, 8
  images = _normalise(rng.normal(size=(n, dim))).astype(np.float32)
  counts = rng.integers(1, 6, size=n)  # 1 to 5 captions per image
  text_image = np.repeat(np.arange(n), counts)
  texts = _normalise(images[text_image] + 0.9 * rng.normal(size=(len(text_image), dim)))
  texts = texts.astype(np.float32)
  texts[3] = texts[4]  # a tie
  got = retrieval.recall_at_k(images, texts, text_image)
  for k in retrieval.KS:
    want_i2t, want_t2i = _brute_force(images, texts, text_image, k)
    assert got[f"i2t_r@{k}"] == want_i2t
    assert got[f"t2i_r@{k}"] == want_t2i
  assert got["num_images"] == n and got["num_texts"] == len(text_image)
  assert 0 < got["i2t_r@1"] < got["i2t_r@10"] <= 1


def test_retrieval_on_the_trained_demo_model(trained_demo_workdir):
  restored = restore_model(trained_demo_workdir)
  config = restored.config
  config.evals.ret = eval_config("retrieval", "demo", resolution="budget:32", max_examples=100)
  out = run_all(restored.model, config, ["ret"])["ret"]
  assert out["num_images"] == 100 and out["num_texts"] == 100
  assert out["t2i_r@10"] > 2 * 10 / 100  # chance is 10%
