"""Packing figures: padding and images per row of each packer, and packer throughput.

The stream: ImageNet-like images (about 500x375, aspect ratios from a mixture around 4:3,
3:4 and 1:1 plus a wide tail), side ~ U(64, 384) with the sqrt-area convention, patch 16,
resized to fit L when larger. Padding is measured on token counts alone (the contents do
not matter); throughput packs real 16x16x3 uint8 patches into batches, set against the
rate at which one core decodes a 500x375 JPEG. Run: .venv/bin/python bench/packing.py
"""

from __future__ import annotations

import io
import time

import grain
import numpy as np
from PIL import Image

from navit_clip.data.batch import BatchSpec
from navit_clip.data.pack import ALGORITHMS, DEFAULT_BINS, DEFAULT_WINDOW, pack
from navit_clip.data.pack_dataset import GRAIN_PACKERS, PackedBatchDataset
from navit_clip.data.patchify import patchify, resize
from navit_clip.data.resolution_sampling import ResolutionSampler

PATCH = 16
NUM_IMAGES = 50_000


def native_sizes(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """(h, w) of ImageNet-like photos: mostly 4:3 landscape, some portrait and square."""
  kind = rng.choice(4, size=n, p=[0.5, 0.15, 0.2, 0.15])
  centre = np.array([4 / 3, 3 / 4, 1.0, 1.0])[kind]
  spread = np.array([0.05, 0.05, 0.02, 0.5])[kind]
  ratio = centre * np.exp(rng.normal(0, spread))  # width / height
  area = 500 * 375 * np.exp(rng.normal(0, 0.3, n))
  return [(max(1, round(np.sqrt(a / r))), max(1, round(np.sqrt(a * r))))
          for a, r in zip(area, ratio)]


def token_counts(seq_len: int, n: int, seed: int = 0) -> list[int]:
  rng = np.random.default_rng(seed)
  sampler = ResolutionSampler("uniform_side", PATCH, seq_len, min_side=64, max_side=384)
  return [h * w // PATCH**2 for h, w in (sampler(rng, *hw) for hw in native_sizes(n, rng))]


def length_only_examples(counts: list[int]) -> list[dict]:
  """Examples with 1-byte patches: enough to measure padding."""
  return [{"patches": np.zeros((n, 1), np.uint8), "positions": np.zeros((n, 2), np.int32),
           "grid_hw": np.array([1, n], np.int32), "example_id": i}
          for i, n in enumerate(counts)]


def padding_table() -> None:
  print(f"padding on {NUM_IMAGES} images (the default window {DEFAULT_WINDOW}, "
        f"{DEFAULT_BINS} open rows / Grain bins)")
  print(f"{'L':>5} {'M':>3} {'packer':<16} {'padding':>8} {'img/row':>8} {'s':>6}")
  for seq_len, max_images in ((256, 8), (1024, 16)):
    counts = token_counts(seq_len, NUM_IMAGES)
    spec = BatchSpec(batch_size=32, seq_len=seq_len, max_images=max_images, patch_size=1,
                     channels=1)
    examples = length_only_examples(counts)
    for packer in ALGORITHMS + GRAIN_PACKERS:
      source = grain.MapDataset.source(examples).to_iter_dataset(
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      start = time.perf_counter()
      batches = list(PackedBatchDataset(source, spec, packer=packer))
      seconds = time.perf_counter() - start
      rows = sum(int(b["image_mask"].any(1).sum()) for b in batches)
      padding = 1 - sum(counts) / (rows * seq_len)
      print(f"{seq_len:>5} {max_images:>3} {packer:<16} {padding:>7.2%} "
            f"{NUM_IMAGES / rows:>8.2f} {seconds:>6.1f}")
    # An image with fewer than `smallest` free tokens left can share its row with nobody.
    smallest = min(counts)
    alone = np.array([n for n in counts if n > seq_len - smallest])
    floor = (seq_len - alone).sum() / (sum(counts) + (seq_len - alone).sum())
    print(f"{seq_len:>5} {'':>3} {'(lower bound)':<16} {floor:>7.2%}   "
          f"{len(alone) / NUM_IMAGES:.0%} of images leave a gap under {smallest} tokens")


def packer_throughput(num: int = 3000) -> None:
  seq_len = 1024
  spec = BatchSpec(batch_size=16, seq_len=seq_len, max_images=16, patch_size=PATCH)
  pool = np.random.default_rng(0).integers(0, 256, (seq_len, spec.patch_dim), np.uint8)
  positions = np.zeros((seq_len, 2), np.int32)
  examples = [{"patches": pool[:n], "positions": positions[:n],
               "grid_hw": np.array([1, n], np.int32), "example_id": i}
              for i, n in enumerate(token_counts(seq_len, num, seed=1))]
  print(f"\npacker throughput, one core, L={seq_len}, 16x16x3 uint8 patches, "
        f"{num} images, batches of {spec.batch_size} rows assembled")
  for packer in ALGORITHMS:
    start = time.perf_counter()
    for _ in pack(examples, spec, packer):
      pass
    rate = num / (time.perf_counter() - start)
    print(f"  {packer:<16} {rate:>9,.0f} images/s")


def decode_throughput(num: int = 200) -> None:
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:375, 0:500]
  smooth = np.stack([xx * 255 / 500, yy * 255 / 375, (xx + yy) * 255 / 875], -1)
  pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  data = buf.getvalue()
  start = time.perf_counter()
  for _ in range(num):
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  decode = num / (time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(num):
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    patchify(resize(image, (224, 304)), PATCH)
  full = num / (time.perf_counter() - start)
  print(f"\nJPEG 500x375 ({len(data) // 1024} KiB), one core: decode {decode:,.0f} images/s; "
        f"decode + resize to 224x304 + patchify {full:,.0f} images/s")


if __name__ == "__main__":
  padding_table()
  packer_throughput()
  decode_throughput()
