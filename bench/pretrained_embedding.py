"""Embedding images with a SigLIP 2 NaFlex B/16-sized tower: packed rows, one image a row,
and transformers' Siglip2 NaFlex vision model. Prints figures; not a test.

  .venv/bin/python bench/pretrained_embedding.py                   # ours, packed vs one a row
  .venv/bin/python bench/pretrained_embedding.py --reference-python /work/torchV/bin/python
  .venv/bin/python bench/pretrained_embedding.py --small           # mu/16, 64 images: smoke
  ... --layouts "packed L=512 blocked,packed L=1024 blocked"       # these and the baseline

One random B/16 NaFlex image tower in our format (learned 16 x 16 position table resized
to each grid, MAP head; `transformers_siglip.configure`) embeds 500 ImageNet-like images
(bench/packing.py's native sizes) under policy naflex:256, the NaFlex processor's default,
with the xla and the blocked attention backends (navit_clip.attention_blocked):
  packed L=1024   rows of 1024 tokens, several images a row (window best-fit), 8 rows a call
  packed L=512    rows of 512 tokens, 16 rows a call
  one a row       rows of 256 tokens, one image each, padded to 256 (what transformers'
                  NaFlex batches are), 32 rows a call
Every layout gets the same 8192 tokens a call. With --reference-python (a Python with
torch and transformers), a subprocess loads the same weights into transformers'
Siglip2VisionModel (sdpa attention) and embeds the same patches, 32 images a call with
its pixel_attention_mask. A round cuts every layout's calls (and transformers') into
--parts slices and times slice k of each in turn before slice k + 1, so that a shared
host's changing load hits all alike. Model-only images/s (batches built beforehand, compile and a warm-up call excluded; the
median of the rounds), speed ratios paired by round (the median of the per-round time
ratios), the padding of each layout, and the largest difference of each layout's
embeddings from xla's one a row (and transformers').

The xla backend scores every pair of a packed row (L x L) and masks the cross-image pairs
away, so packing several images a row costs attention that one image a row does not (at
L=1024 with about 4 images, 4x the scores); the blocked backend computes only the blocks
of queries and keys that share an image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from navit_clip.config import default_config
from navit_clip.data.batch import BatchSpec
from navit_clip.data.pack import pack
from navit_clip.data.patchify import patchify
from navit_clip.data.resolution_sampling import naflex_size
from navit_clip.image_tower import ImageTower
from navit_clip.transformers_siglip import Architecture, configure
from navit_clip.variants import parse_variant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packing import native_sizes  # noqa: E402  (bench/packing.py: ImageNet-like sizes)

TOKENS_PER_CALL = 8192
# name, attention backend, L, M
LAYOUTS = (("packed L=1024 xla", "xla", 1024, 8), ("packed L=1024 blocked", "blocked", 1024, 8),
           ("packed L=512 blocked", "blocked", 512, 4), ("one a row xla", "xla", 256, 1),
           ("one a row blocked", "blocked", 256, 1))
BASELINE = "one a row xla"
REFERENCE_NAME = "transformers"


def tower_config(variant: str, budget: int):
  """config.model.image of a SigLIP 2 NaFlex tower of `variant` ("B/16")."""
  size, patch = parse_variant(variant)
  side = int(np.sqrt(budget))
  arch = Architecture(naflex=True, vision=size, text=size, patch_size=patch, channels=3,
                      posemb_side=side, image_size=0, vocab_size=32000, text_len=64)
  config = default_config()
  configure(config, arch)
  return config.model.image


def naflex_examples(n: int, patch: int, budget: int, seed: int = 0) -> list[dict]:
  """n images at their naflex:budget sizes, random pixels, patchified."""
  rng = np.random.default_rng(seed)
  examples = []
  for i, (h, w) in enumerate(native_sizes(n, rng)):
    size = naflex_size(h, w, patch, budget)
    pixels = rng.integers(0, 256, (*size, 3), np.uint8)
    patches, positions, grid = patchify(pixels, patch)
    examples.append(dict(patches=patches, positions=positions, grid_hw=grid, example_id=i))
  return examples


def layout_batches(examples: list[dict], seq_len: int, max_images: int, patch: int) -> list:
  spec = BatchSpec(batch_size=TOKENS_PER_CALL // seq_len, seq_len=seq_len,
                   max_images=max_images, patch_size=patch)
  return list(pack(iter(examples), spec, "window_best_fit"))


def padding(batches: list[dict]) -> float:
  return float(1 - np.mean([(b["segment_ids"] > 0).mean() for b in batches]))


def embed_fn(image_config, backend: str, state):
  """embed(batches) -> {example id: embedding} with the tower of `image_config` and
  `backend`, on the parameters `state`; compiled on first use."""
  config = image_config.copy_and_resolve_references()
  config.attention = backend
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: ImageTower.from_config(config,
                                                                        rngs=nnx.Rngs(0))))
  keys = ("patches", "segment_ids", "positions", "grid_hw", "image_mask")

  @jax.jit
  def run(state, batch):
    return nnx.merge(graphdef, state)({k: batch[k] for k in keys})[0]

  def embed(batches: list[dict]) -> dict[int, np.ndarray]:
    out = {}
    for batch in batches:
      emb = np.asarray(run(state, {k: jnp.asarray(batch[k]) for k in keys}))
      mask = batch["image_mask"]
      out.update(zip(batch["example_id"][mask].tolist(), emb[mask]))
    return out

  return embed


def to_transformers(params: dict, depth: int) -> dict[str, np.ndarray]:
  """Our image tower's parameters under transformers' Siglip2VisionModel names."""
  def linear(p):
    return {"weight": np.asarray(p["kernel"]).T, "bias": np.asarray(p["bias"])}

  def norm(p):
    return {"weight": np.asarray(p["scale"]), "bias": np.asarray(p["bias"])}

  tree = {"embeddings.patch_embedding": linear(params["embedding"]),
          "post_layernorm": norm(params["encoder"]["norm"]),
          "head.layernorm": norm(params["head"]["norm"]),
          "head.attention.out_proj": linear(params["head"]["attn"]["out"])}
  table = np.asarray(params["posemb"]["table"])
  tree["embeddings.position_embedding"] = {"weight": table.reshape(-1, table.shape[-1])}
  for i in range(depth):
    block, name = params["encoder"]["blocks"][i], f"encoder.layers.{i}"
    tree[f"{name}.layer_norm1"], tree[f"{name}.layer_norm2"] = (norm(block["norm1"]),
                                                                norm(block["norm2"]))
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                         ("out", "out_proj")):
      tree[f"{name}.self_attn.{theirs}"] = linear(block["attn"][ours])
    for fc in ("fc1", "fc2"):
      tree[f"{name}.mlp.{fc}"] = linear(block["mlp"][fc])
  for fc in ("fc1", "fc2"):
    tree[f"head.mlp.{fc}"] = linear(params["head"]["mlp"][fc])
  head = params["head"]["attn"]
  qkv = [linear(head[k]) for k in ("query", "key", "value")]
  tree["head.attention"] = {"in_proj_weight": np.concatenate([p["weight"] for p in qkv]),
                            "in_proj_bias": np.concatenate([p["bias"] for p in qkv])}
  tree["head"] = {"probe": np.asarray(params["head"]["probe"])[None]}
  return {f"vision_model.{module}.{leaf}": value for module, leaves in tree.items()
          for leaf, value in leaves.items()}


REFERENCE_SCRIPT = r'''
import json, sys, time
import numpy as np, torch, transformers
folder, rows = sys.argv[1], int(sys.argv[2])
meta = json.load(open(f"{folder}/meta.json"))
data = np.load(f"{folder}/inputs.npz")
pixels = torch.from_numpy(data["patches"].astype(np.float32) / 127.5 - 1.0)
mask, shapes = torch.from_numpy(data["mask"]), torch.from_numpy(data["grids"])
config = transformers.Siglip2VisionConfig(**meta["config"])
model = transformers.Siglip2VisionModel(config).eval()
prefixed = next(iter(model.state_dict())).startswith("vision_model.")  # differs by version
weights = {(k if prefixed else k.removeprefix("vision_model.")): torch.from_numpy(v)
           for k, v in np.load(f"{folder}/weights.npz").items()}
model.load_state_dict(weights, strict=True)
calls = [slice(s, s + rows) for s in range(0, len(pixels), rows)]
with torch.no_grad():  # warm-up: one call
  model(pixel_values=pixels[calls[0]], pixel_attention_mask=mask[calls[0]],
        spatial_shapes=shapes[calls[0]])
print(json.dumps({"ready": True, "torch": torch.__version__,
                  "transformers": transformers.__version__,
                  "attention": model.config._attn_implementation,
                  "threads": torch.get_num_threads()}), flush=True)
out = {}
for line in sys.stdin:  # "A B": embed calls [A, B) and time them
  a, b = map(int, line.split())
  start = time.perf_counter()
  with torch.no_grad():
    for j in range(a, b):
      c = calls[j]
      out[j] = model(pixel_values=pixels[c], pixel_attention_mask=mask[c],
                     spatial_shapes=shapes[c]).pooler_output
  seconds = time.perf_counter() - start
  if len(out) == len(calls):
    np.save(f"{folder}/embeddings.npy", torch.cat([out[j] for j in range(len(calls))]).numpy())
  print(json.dumps({"seconds": seconds}), flush=True)
'''


class Reference:
  """transformers' Siglip2VisionModel in a subprocess of `python`, on the same weights and
  patches, 32 images a call; `seconds(part, parts)` times part `part` of `parts` of the
  calls."""

  def __init__(self, python: str, folder: str, examples: list[dict], params: dict,
               image_config, budget: int):
    size, patch = parse_variant(image_config.variant)
    n = len(examples)
    patches = np.zeros((n, budget, patch * patch * 3), np.uint8)
    mask = np.zeros((n, budget), np.int32)
    for i, e in enumerate(examples):
      patches[i, :len(e["patches"])], mask[i, :len(e["patches"])] = e["patches"], 1
    grids = np.stack([e["grid_hw"] for e in examples]).astype(np.int64)
    np.savez(os.path.join(folder, "inputs.npz"), patches=patches, mask=mask, grids=grids)
    np.savez(os.path.join(folder, "weights.npz"), **to_transformers(params, size.depth))
    config = dict(hidden_size=size.width, intermediate_size=size.mlp_dim,
                  num_hidden_layers=size.depth, num_attention_heads=size.num_heads,
                  patch_size=patch, num_patches=image_config.posemb_resolution ** 2)
    with open(os.path.join(folder, "meta.json"), "w") as f:
      json.dump({"config": config}, f)
    self.folder = folder
    self.calls = -(-n // (TOKENS_PER_CALL // budget))
    self.proc = subprocess.Popen(
        [python, "-c", REFERENCE_SCRIPT, folder, str(TOKENS_PER_CALL // budget)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._reply()

  def _reply(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the reference subprocess ended (exit {self.proc.wait()})")
    return json.loads(line)

  def embeddings(self) -> dict[int, np.ndarray]:
    return dict(enumerate(np.load(os.path.join(self.folder, "embeddings.npy"))))

  def seconds(self, part: int, parts: int) -> float:
    calls = part_of(list(range(self.calls)), part, parts)
    self.proc.stdin.write(f"{calls[0]} {calls[-1] + 1}\n" if calls else "0 0\n")
    self.proc.stdin.flush()
    return self._reply()["seconds"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def part_of(items: list, part: int, parts: int) -> list:
  """The `part`-th of `parts` contiguous, near-equal slices of `items`."""
  return items[part * len(items) // parts:(part + 1) * len(items) // parts]


def timed(embed, batches) -> tuple[float, dict]:
  start = time.perf_counter()
  out = embed(batches)
  return time.perf_counter() - start, out


def paired_ratio(times: dict, name: str, base: str) -> float:
  """The median over rounds of base's time / name's time in the same round: a speed ratio
  that load changing between rounds (a shared machine) moves less than a ratio of medians."""
  return statistics.median(b / t for b, t in zip(times[base], times[name]))


def report(n: int, times: dict, pads: dict, diffs: dict) -> None:
  """One line a layout: padding, images/s (n / the median round), speed vs the baseline and
  vs transformers (paired by round), largest difference from the baseline's embeddings."""
  ref = REFERENCE_NAME in times
  print(f"{'layout':22s} {'padding':>8s} {'images/s':>9s} {'vs ' + BASELINE:>17s}"
        + (f" {'vs ' + REFERENCE_NAME:>16s}" if ref else "") + f" {'max |diff|':>11s}")
  for name, t in times.items():
    print(f"{name:22s} {pads[name]:8.1%} {n / statistics.median(t):9.2f} "
          f"{paired_ratio(times, name, BASELINE):16.2f}x"
          + (f" {paired_ratio(times, name, REFERENCE_NAME):15.2f}x" if ref else "")
          + f" {diffs[name]:11.1e}")


def measure(layouts: dict, embeds: dict, reference: Reference | None, repeats: int,
            parts: int) -> tuple[dict, dict]:
  """(seconds per round, embeddings) of every layout (and the reference).

  Each round cuts every layout's calls into `parts` slices and times slice k of every
  layout, in a rotating order, before slice k + 1: the layouts share each stretch of the
  host's load, so a load that changes over minutes moves them alike.
  """
  for name, batches in layouts.items():  # compile and warm up: one call each
    embeds[name](batches[:1])
  names = [*layouts, *([REFERENCE_NAME] if reference else [])]
  times, outputs = {name: [0.0] * repeats for name in names}, {name: {} for name in layouts}
  for r in range(repeats):
    for k in range(parts):
      shift = (r * parts + k) % len(names)
      for name in names[shift:] + names[:shift]:
        if name == REFERENCE_NAME:
          times[name][r] += reference.seconds(k, parts)
          continue
        seconds, out = timed(embeds[name], part_of(layouts[name], k, parts))
        times[name][r] += seconds
        outputs[name].update(out)
    print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{name} {times[name][r]:.1f} s"
                                                   for name in names),
          file=sys.stderr, flush=True)
  if reference:
    outputs[REFERENCE_NAME] = reference.embeddings()
  return times, outputs


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--small", action="store_true", help="mu/16 and 64 images: a smoke run")
  p.add_argument("--images", type=int, default=500)
  p.add_argument("--repeats", type=int, default=3, help="timed rounds")
  p.add_argument("--parts", type=int, default=10,
                 help="slices a round is timed in, layout by layout (interleaved)")
  p.add_argument("--reference-python", default="",
                 help="a Python with torch and transformers: also time transformers")
  p.add_argument("--layouts", default="",
                 help="comma-separated layout names to time (default: all); the baseline, "
                      f"{BASELINE!r}, is always timed")
  args = p.parse_args()
  chosen = [name for name, *_ in LAYOUTS
            if not args.layouts or name in args.layouts.split(",") or name == BASELINE]
  unknown = set(filter(None, args.layouts.split(","))) - {name for name, *_ in LAYOUTS}
  if unknown:
    p.error(f"--layouts: unknown {sorted(unknown)}; choose from {[n for n, *_ in LAYOUTS]}")
  variant, n, budget = ("mu/16", 64, 256) if args.small else ("B/16", args.images, 256)
  image_config = tower_config(variant, budget)
  state = nnx.state(ImageTower.from_config(image_config, rngs=nnx.Rngs(0)))
  patch = parse_variant(variant)[1]
  examples = naflex_examples(n, patch, budget)
  layouts = {name: layout_batches(examples, seq_len, m, patch)
             for name, _, seq_len, m in LAYOUTS if name in chosen}
  embeds = {name: embed_fn(image_config, backend, state)
            for name, backend, _, _ in LAYOUTS if name in chosen}
  with tempfile.TemporaryDirectory() as folder:
    reference = (Reference(args.reference_python, folder, examples,
                           nnx.to_pure_dict(nnx.state(state, nnx.Param)), image_config, budget)
                 if args.reference_python else None)
    times, outputs = measure(layouts, embeds, reference, args.repeats, args.parts)
    if reference:
      reference.close()
  base = outputs[BASELINE]
  diffs = {name: max(float(np.abs(out[k] - base[k]).max()) for k in base)
           for name, out in outputs.items()}
  pads = {name: padding(batches) for name, batches in layouts.items()}
  if reference:
    pads[REFERENCE_NAME] = 1 - sum(len(e["patches"]) for e in examples) / (n * budget)
  print(f"{variant} SigLIP 2 NaFlex image tower, {n} ImageNet-like images at naflex:{budget} "
        f"(mean {np.mean([len(e['patches']) for e in examples]):.0f} patches), "
        f"{TOKENS_PER_CALL} tokens a call, {jax.devices()[0].platform}, median of "
        f"{args.repeats} rounds"
        + (f"; reference {json.dumps(reference.info)}" if reference else ""))
  report(n, times, pads, diffs)


if __name__ == "__main__":
  main()
