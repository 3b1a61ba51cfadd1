"""Host data pipeline throughput, set beside what an accelerator consumes. Prints figures.

  .venv/bin/python bench/data_pipeline.py            # about 3 minutes on 2 cores
  .venv/bin/python bench/data_pipeline.py --quick    # a smoke run

1. Decode alone, one core: ImageNet-like JPEGs (500x375 and 375x500, quality 90) and
   web-sized ones (1024x768) decoded for a target side ~ U(64, 384) (sqrt-area convention),
   at full size then resized, or at reduced scale (PIL draft: 1/2, 1/4, 1/8, never below the
   target) then resized. A 500x375 JPEG gains only for targets below half its size.
2. The whole host pipeline as training runs it (ArrayRecord shards -> global shuffle ->
   decode -> resolution sampling -> resize -> patchify -> tokenize -> count -> pack, S/16,
   L = 1024, M = 16, B = 8 rows), with and without reduced-scale decoding, with 0, 1 and 2
   Grain worker processes. Images/s counts images in the packed batches. With 0 workers
   the per-example work still runs on Grain's read threads in the main process (decode and
   resize release the GIL), so it can use both cores; a worker process adds the transfer
   of patches through shared memory. Then the per-example work alone in one thread: the
   rate one worker core sustains.
3. Consumption: images/s a train step takes on one accelerator for S/16 and B/16 (image
   tower at the same token counts plus a text tower at T = 64), from the FLOPs per image
   and an assumed sustained rate (default 400 TFLOP/s: an H100 at ~40% of its 989 TFLOP/s
   dense bf16 peak), and the host cores that keep it fed at the measured per-core rate.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from navit_clip.config_loading import load_config
from navit_clip.data import pipeline
from navit_clip.data.decode import open_image
from navit_clip.data.sources.demo import caption_corpus
from navit_clip.data.patchify import resize
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.variants import parse_variant
from navit_clip.text.tokenizer import train_tokenizer

PATCH, SEQ_LEN, MAX_IMAGES, ROWS, TEXT_LEN = 16, 1024, 16, 8, 64
MIN_SIDE, MAX_SIDE = 64, 384


def photo_like_jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
  """A JPEG with photo-like entropy: smooth blobs plus texture noise (about 40-60 KB)."""
  small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
  noisy = np.clip(base + rng.integers(-24, 25, (h, w, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def write_corpus(root: str, n: int) -> tuple[str, list[bytes]]:
  from array_record.python.array_record_module import ArrayRecordWriter
  rng = np.random.default_rng(0)
  captions = list(caption_corpus(n))
  images = [photo_like_jpeg(rng, *((375, 500) if i % 4 else (500, 375))) for i in range(n)]
  shards = 4
  for s in range(shards):
    writer = ArrayRecordWriter(os.path.join(root, f"data-{s}.array_record"), "group_size:1")
    for i in range(s, n, shards):
      writer.write(encode_example({"image/encoded": images[i], "caption": captions[i],
                                   "example_id": i, "image/format": "jpeg"}))
    writer.close()
  return os.path.join(root, "data-*.array_record"), images


def bench_decode(images: list[bytes], seconds: float) -> dict[bool, float]:
  """Images/s of decode + resize on this core, with and without draft, timed alternately
  image by image so that a change in host load hits both alike."""
  sampler = ResolutionSampler(kind="uniform_side", patch_size=PATCH, max_patches=SEQ_LEN,
                              min_side=MIN_SIDE, max_side=MAX_SIDE)
  rng = np.random.default_rng(0)
  spent, n, t0 = {False: 0.0, True: 0.0}, 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    data = images[n % len(images)]
    hw = None
    for draft in (False, True):
      t = time.perf_counter()
      opened = open_image(data)
      if hw is None:
        hw = sampler(rng, *opened.size_hw)
      resize(opened.load(hw if draft else None), hw)
      spent[draft] += time.perf_counter() - t
    n += 1
  return {draft: n / s for draft, s in spent.items()}


def bench_pipeline(config, seconds: float) -> tuple[float, float]:
  """(images/s, tokens per image) of packed batches after the first batch (warm-up)."""
  it = iter(pipeline.make_train_dataset(config, process_index=0, process_count=1))
  next(it)
  images = tokens = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    batch = next(it)
    images += int(batch["image_mask"].sum())
    tokens += int((batch["segment_ids"] > 0).sum())
  rate = images / (time.perf_counter() - t0)
  if hasattr(it, "close"):
    it.close()
  return rate, tokens / max(images, 1)


def bench_per_example(config, seconds: float) -> float:
  """Images/s of the per-example work (read, decode, sample, resize, patchify, tokenize) in
  one thread: what one worker core sustains."""
  records = pipeline.make_records(config, seed=0)
  preprocess = pipeline.make_preprocessor(config, seed=0)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    preprocess(n, records[n])
    n += 1
  return n / (time.perf_counter() - t0)


def train_flops_per_image(variant: str, text: str, tokens: float, seq_len: int) -> float:
  """Forward + backward matmul FLOPs (3x forward) per image: image tower at `tokens`
  patches in rows of `seq_len` (attention over the whole row), text tower at TEXT_LEN."""

  def per_token(width: int, depth: int, mlp: int, context: int) -> float:
    return depth * 2 * (4 * width * width + 2 * width * mlp + 2 * context * width)

  size, patch = parse_variant(variant)
  img = tokens * (per_token(size.width, size.depth, size.mlp_dim, seq_len)
                  + 2 * patch * patch * 3 * size.width)
  t, _ = parse_variant(text)
  txt = TEXT_LEN * per_token(t.width, t.depth, t.mlp_dim, TEXT_LEN)
  return 3 * (img + txt)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="short timings")
  parser.add_argument("--images", type=int, default=200, help="JPEGs in the corpus")
  parser.add_argument("--device-tflops", type=float, default=400.0,
                      help="sustained accelerator TFLOP/s for the consumption figures")
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  seconds = 3.0 if args.quick else 12.0
  with tempfile.TemporaryDirectory() as root:
    files, images = write_corpus(root, args.images)
    tokenizer = os.path.join(root, "tok.model")
    train_tokenizer(caption_corpus(4000), 64, tokenizer, lowercase=True)
    print(f"corpus: {len(images)} JPEGs, mean {np.mean([len(b) for b in images]) / 1e3:.0f} KB, "
          f"500x375 / 375x500; side ~ U({MIN_SIDE}, {MAX_SIDE}), patch {PATCH}")
    rng = np.random.default_rng(1)
    large = [photo_like_jpeg(rng, 768, 1024) for _ in range(8)]
    print("\n1. decode + resize to side ~ U(64, 384), one core:")
    for name, corpus in (("500x375 ", images), ("1024x768", large)):
      dec = bench_decode(corpus, seconds)
      print(f"   {name}: full {dec[False]:6.1f} img/s, reduced scale {dec[True]:6.1f} img/s "
            f"({dec[True] / dec[False]:.2f}x)")

    config = load_config("demo")
    config.model.image.variant = "S/16"
    config.model.text.variant = "S"
    config.model.text.max_len = TEXT_LEN
    config.model.text.vocab_size = 64
    d = config.data
    d.source, d.train_files = "arrayrecord", files
    d.tokenizer.path, d.tokenizer.lowercase = tokenizer, True
    d.batch_size, d.seq_len, d.max_images = ROWS, SEQ_LEN, MAX_IMAGES
    d.resolution.kind, d.resolution.min_side, d.resolution.max_side = (
        "uniform_side", MIN_SIDE, MAX_SIDE)
    d.token_drop.kind = "none"
    print("\n2. whole host pipeline (ArrayRecord -> packed S/16 batches, L=1024, M=16, B=8):")
    print(f"   {'decode':>13s} {'workers':>7s} {'img/s':>8s} {'tokens/img':>10s}")
    rates = {}
    for draft in (False, True):
      for workers in (0, 1, 2):
        d.decode.draft, d.num_workers = draft, workers
        rate, tok = bench_pipeline(config, seconds)
        rates[draft, workers] = rate
        print(f"   {'reduced scale' if draft else 'full':>13s} {workers:7d} {rate:8.1f} "
              f"{tok:10.1f}")
    per_core = {}
    for draft in (False, True):
      d.decode.draft = draft
      per_core[draft] = bench_per_example(config, seconds)
    print(f"   per-example work in one thread (one worker core): full decode "
          f"{per_core[False]:.1f} img/s, reduced scale {per_core[True]:.1f} img/s")
    print(f"\n3. consumption on one accelerator at {args.device_tflops:.0f} TFLOP/s sustained, "
          f"{tok:.0f} tokens/image in rows of {SEQ_LEN}:")
    for variant, text in (("S/16", "S"), ("B/16", "B")):
      flops = train_flops_per_image(variant, text, tok, SEQ_LEN)
      need = args.device_tflops * 1e12 / flops
      print(f"   {variant}: {flops / 1e9:6.1f} GFLOP/image -> {need:7.0f} img/s -> "
            f"{need / per_core[True]:4.0f} worker cores with reduced-scale decode, "
            f"{need / per_core[False]:4.0f} without (+1 for packing and transfer)")


if __name__ == "__main__":
  main()
