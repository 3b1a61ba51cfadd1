"""Embedding throughput: images packed several per row against one image per row. Not a test.

  .venv/bin/python bench/embedding.py            # Ti/16, 512 demo images, budget 64 tokens
  .venv/bin/python bench/embedding.py --small    # mu/16, 128 images: a quick smoke run

Both layouts embed the same images at the same resolution policy (at most `budget` patches
an image, aspect kept; the demo's native sizes of 24-256 px mean many images need fewer),
with the same tokens per call (B x L):
  packed       rows of L = 4 x budget, up to 16 images a row (window best-fit packing)
  one per row  rows of L = budget, one image each (each row padded to the budget)
Model-only images/s (batches built beforehand, compile excluded; the median of alternating
repeats), the padding fraction of each layout, and the largest difference between the two
layouts' embeddings of an image.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from navit_clip.config import default_config
from navit_clip.data.sources.demo import DemoSource
from navit_clip.evaluate.embedder import Embedder
from navit_clip.evaluate.inference_batches import inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec
from navit_clip.model import TwoTower


def _batches(config, source, policy, **shape) -> list[dict]:
  spec = inference_spec(config, policy, **shape)
  sampler = policy.sampler(spec.patch_size, spec.seq_len, config.data.resolution.max_upscale)
  return list(inference_batches(source, spec, sampler))


def _embed_all(embedder: Embedder, batches: list[dict]) -> dict[int, np.ndarray]:
  out = {}
  for batch in batches:
    emb = embedder.images(batch)
    for i, e in zip(batch["example_id"][batch["image_mask"]], emb[batch["image_mask"]]):
      out[int(i)] = e
  return out


def _seconds(embedder: Embedder, batches: list[dict]) -> float:
  t0 = time.perf_counter()
  for batch in batches:
    embedder.images(batch)
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--small", action="store_true", help="mu/16 and 128 images")
  p.add_argument("--budget", type=int, default=64, help="patch budget per image")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  n = 128 if args.small else 512
  config = default_config()
  config.model.image.variant = "mu/16" if args.small else "Ti/16"
  config.model.text.variant = "mu"
  config.model.text.vocab_size = 64
  policy = ResolutionPolicy("budget", args.budget)
  tokens_per_call = 8 * 4 * args.budget
  source = DemoSource("eval", num_examples=n)
  packed = _batches(config, source, policy, batch_size=8, seq_len=4 * args.budget,
                    max_images=16)
  single = _batches(config, source, policy, batch_size=tokens_per_call // args.budget,
                    seq_len=args.budget, max_images=1)
  embedder = Embedder(TwoTower(config, rngs=nnx.Rngs(0)))
  emb_packed, emb_single = _embed_all(embedder, packed), _embed_all(embedder, single)  # compile
  assert sorted(emb_packed) == sorted(emb_single) and len(emb_packed) == n
  diff = max(float(np.abs(emb_packed[k] - emb_single[k]).max()) for k in emb_packed)
  times = {"packed": [], "single": []}
  for _ in range(args.repeats):
    times["packed"].append(_seconds(embedder, packed))
    times["single"].append(_seconds(embedder, single))
  print(f"{config.model.image.variant}, {n} demo images (24-256 px), policy {policy}, "
        f"{tokens_per_call} tokens per call, {jax.devices()[0].platform} "
        f"({jax.device_count()} device)")
  print(f"{'layout':12s} {'rows':>5s} {'L':>5s} {'padding':>8s} {'images/s':>9s}")
  rates = {}
  for name, batches in (("packed", packed), ("single", single)):
    seg = np.stack([b["segment_ids"] for b in batches])
    padding = 1 - (seg > 0).mean()
    rates[name] = n / statistics.median(times[name])
    label = "packed" if name == "packed" else "one per row"
    print(f"{label:12s} {seg.shape[0] * seg.shape[1]:5d} {seg.shape[2]:5d} {padding:8.1%} "
          f"{rates[name]:9.1f}")
  print(f"packed / one per row: {rates['packed'] / rates['single']:.2f}x images/s; "
        f"max |embedding difference| {diff:.1e}")


if __name__ == "__main__":
  main()
