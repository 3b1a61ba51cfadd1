"""How each shipped recipe packs: the share of images shrunk to fit a row, images per row,
padding.

Each recipe's own sampler, token dropper and packer (`config.data`) on a stream of
ImageNet-sized 500x375 images, simulated on token counts alone (no decoding: the contents
do not change the packing). An image whose sampled size has more patches than the row is
shrunk to fit it (`ResolutionSampler.sample`); a recipe where many are sits at the row
length instead of its side distribution. Run: .venv/bin/python bench/recipe_packing.py
"""

from __future__ import annotations

import os

import numpy as np

from navit_clip.config_loading import load_config
from navit_clip.data import pipeline
from navit_clip.data.pack import make_planner
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.token_drop import TokenDropper, drop_tokens

NATIVE_HW = (375, 500)
NUM_IMAGES = 20_000


def recipes() -> list[str]:
  """The names of the shipped recipes (configs/*.py)."""
  import navit_clip.configs as pkg
  return sorted(f[:-3] for f in os.listdir(os.path.dirname(pkg.__file__))
                if f.endswith(".py") and not f.startswith("_"))


def token_counts(config, num_images: int, seed: int = 0) -> tuple[list[int], int]:
  """(tokens kept per image, images shrunk to fit) for `num_images` 500x375 images."""
  spec = pipeline.batch_spec(config)
  sampler = ResolutionSampler.from_config(config.data.resolution, spec.patch_size,
                                          spec.seq_len)
  dropper = TokenDropper.from_config(config.data.token_drop)
  rng = np.random.default_rng(seed)
  counts, shrunk = [], 0
  for i in range(num_images):
    h, w, was_shrunk = sampler.sample(rng, *NATIVE_HW)
    n = (h // spec.patch_size) * (w // spec.patch_size)
    rate = dropper.sample_rate(rng, n, images_seen=i)
    kept = drop_tokens(rng, np.empty((n, 1), np.uint8), np.zeros((n, 2), np.int32), rate)[0]
    counts.append(kept.shape[0])
    shrunk += was_shrunk
  return counts, shrunk


def packed_rows(counts: list[int], config) -> list[list[int]]:
  """The rows (lists of image indices) that the recipe's packer builds from `counts`."""
  d = config.data
  planner = make_planner(d.packer, d.seq_len, d.max_images, d.pack_window, d.pack_bins)
  rows, pending = [], iter(enumerate(counts))
  exhausted = False
  while True:
    if not exhausted and planner.wants_input():
      item = next(pending, None)
      exhausted = item is None
      if item is not None:
        planner.add(*item)
      continue
    row = planner.next_row(final=exhausted)
    if row is None:
      return rows
    rows.append(row)


def recipe_packing(config, num_images: int = NUM_IMAGES) -> dict[str, float]:
  """{"shrunk", "images_per_row", "padding", "tokens_per_image"} of `config`'s data."""
  counts, shrunk = token_counts(config, num_images)
  rows = packed_rows(counts, config)
  return {"shrunk": shrunk / num_images, "images_per_row": num_images / len(rows),
          "padding": 1.0 - sum(counts) / (len(rows) * config.data.seq_len),
          "tokens_per_image": sum(counts) / num_images}


def _drop(config) -> str:
  t = config.data.token_drop
  if t.kind == "none":
    return "none"
  if t.kind == "resolution":
    return f"resolution {t.min_rate:g}-{t.max_rate:g}"
  return f"{t.kind} {t.rate:g}" + (" scheduled" if t.schedule else "")


def main() -> None:
  print(f"packing of every recipe on {NUM_IMAGES} images of {NATIVE_HW[1]}x{NATIVE_HW[0]}")
  print("| config | L | M | side | token drop | shrunk | images/row | padding |")
  print("|---|---|---|---|---|---|---|---|")
  for name in recipes():
    c = load_config(name)
    r, res = recipe_packing(c), c.data.resolution
    side = (f"U({res.min_side:g}, {res.max_side:g})" if res.kind == "uniform_side"
            else res.kind)
    print(f"| `{name}` | {c.data.seq_len} | {c.data.max_images} | {side} | {_drop(c)} | "
          f"{r['shrunk']:.1%} | {r['images_per_row']:.2f} | {r['padding']:.2%} |")


if __name__ == "__main__":
  main()
