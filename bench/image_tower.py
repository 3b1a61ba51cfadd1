"""Image tower throughput and the cost of packed attention. Prints figures; not a test.

  .venv/bin/python bench/image_tower.py            # S/16, 8 rows of L=256 (a few minutes on CPU)
  .venv/bin/python bench/image_tower.py --small    # Ti/16, 2 rows: a quick smoke run

1. Train-step throughput: forward + backward of the tower (loss = sum of squared embeddings,
   gradients w.r.t. all parameters) on packed rows of 8 images x 32 tokens. FLOPs are counted
   analytically (matmuls only, x3 for forward + backward; attention over all L x L pairs, as
   the dense masked kernels compute them) and by XLA's cost analysis of the compiled step, and
   shown as a fraction of the f32 matmul rate measured in the same run.
2. Packed vs one image per row: the same tokens (equal images of n = 32 tokens) laid out as
   rows of L = 256 holding 8 images each with segment-masked attention, or as rows of L = n
   holding one image each (no padding, no mask needed: the best case for the unpacked layout).
   Both run forward + backward, first of attention alone, then of the whole tower. Packing
   computes L / n = 8x the attention scores (most of them masked away), so the ratio measures
   what the masked pairs cost; with images of varying size the unpacked layout must also pad
   every row to the largest image, which packing avoids.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from navit_clip.attention import attention
from navit_clip.image_tower import ImageTower
from navit_clip.variants import parse_variant


def _time_pair(a, b, *, repeats: int) -> tuple[float, float]:
  """Median seconds of two (fn, args) calls after a warm-up (compile) call of each, timed
  alternately so that a change in host load hits both alike."""
  for fn, args in (a, b):
    jax.block_until_ready(fn(*args))
  times = ([], [])
  for _ in range(repeats):
    for (fn, args), out in zip((a, b), times):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - start)
  return statistics.median(times[0]), statistics.median(times[1])


def matmul(n: int):
  """(fn, args, flops) of an f32 n x n x n jnp.dot, the reference rate for utilisation."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  return jax.jit(jnp.dot), (a, b), 2 * n ** 3


def packed_batch(rows: int, length: int, image_tokens: int, patch_dim: int, seed: int = 0):
  """Rows of L tokens, each holding L // image_tokens images of a 4 x (n/4) patch grid."""
  per_row = length // image_tokens
  h = 4
  w = image_tokens // h
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  pos = np.stack([ys.ravel(), xs.ravel()], -1)
  rng = np.random.default_rng(seed)
  return {
      "patches": jnp.asarray(rng.integers(0, 256, (rows, length, patch_dim), np.uint8)),
      "segment_ids": jnp.asarray(np.broadcast_to(
          np.repeat(np.arange(1, per_row + 1, dtype=np.int32), image_tokens), (rows, length))),
      "positions": jnp.asarray(np.broadcast_to(np.tile(pos, (per_row, 1)), (rows, length, 2)),
                               jnp.int32),
      "grid_hw": jnp.full((rows, length, 2), jnp.asarray([h, w], jnp.int32)),
      "image_mask": jnp.ones((rows, per_row), bool),
  }


def analytic_flops(variant: str, rows: int, length: int, max_images: int,
                   channels: int = 3) -> float:
  """Matmul FLOPs of one forward + backward (3x forward) over rows of `length` tokens."""
  size, patch = parse_variant(variant)
  d, f, n, m = size.width, size.mlp_dim, length, max_images
  embed = 2 * n * patch * patch * channels * d
  block = 2 * n * 4 * d * d + 2 * n * 2 * d * f + 2 * 2 * n * n * d
  head = 2 * n * 2 * d * d + 2 * m * 2 * d * d + 2 * 2 * m * n * d + 2 * m * 2 * d * f
  return 3 * rows * (embed + size.depth * block + head)


def tower_step(tower: ImageTower):
  graphdef, state = nnx.split(tower)

  def loss(state, batch):
    emb, _ = nnx.merge(graphdef, state)(batch)
    return (emb ** 2).sum()

  return jax.jit(jax.grad(loss)), state


def attention_step(q_segment_ids):
  def loss(q, k, v):
    return (attention(q, k, v, q_segment_ids, q_segment_ids) ** 2).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="S/16")
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--image-tokens", type=int, default=32)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  parser.add_argument("--scan-layers", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--small", action="store_true", help="Ti/16, 2 rows, 2 repeats")
  args = parser.parse_args()
  if args.small:
    args.variant, args.rows, args.repeats = "Ti/16", 2, 2
  if args.seq_len % args.image_tokens or args.image_tokens % 4:
    parser.error("--image-tokens must divide --seq-len and be a multiple of 4")

  size, patch = parse_variant(args.variant)
  patch_dim = patch * patch * 3
  per_row = args.seq_len // args.image_tokens
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device), "
        f"{args.variant} {args.dtype}, remat={args.remat}, scan_layers={args.scan_layers}")


  def make_tower():
    return ImageTower(variant=args.variant, dtype=args.dtype, remat=args.remat,
                      scan_layers=args.scan_layers, rngs=nnx.Rngs(0))

  # 1. Throughput of the packed train step.
  step, state = tower_step(make_tower())
  packed = packed_batch(args.rows, args.seq_len, args.image_tokens, patch_dim)
  cost = step.lower(state, packed).compile().cost_analysis()
  xla_flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
  mm_fn, mm_args, mm_flops = matmul(2048)
  t_packed, t_mm = _time_pair((step, (state, packed)), (mm_fn, mm_args), repeats=args.repeats)
  peak = mm_flops / t_mm
  print(f"f32 matmul 2048^3, timed alternately with the step: {peak / 1e9:.1f} GFLOP/s")
  flops = analytic_flops(args.variant, args.rows, args.seq_len, per_row)
  tokens = args.rows * args.seq_len
  print(f"\n[1] train step, {args.rows} rows x L={args.seq_len} "
        f"({per_row} images x {args.image_tokens} tokens per row)")
  print(f"  time {t_packed * 1e3:.0f} ms, {tokens / t_packed:.0f} tokens/s, "
        f"{args.rows * per_row / t_packed:.1f} images/s")
  print(f"  analytic {flops / 1e9:.1f} GFLOP -> {flops / t_packed / 1e9:.1f} GFLOP/s = "
        f"{flops / t_packed / peak:.1%} of the measured matmul rate")
  print(f"  XLA cost analysis {xla_flops / 1e9:.1f} GFLOP -> {xla_flops / t_packed / 1e9:.1f} "
        f"GFLOP/s = {xla_flops / t_packed / peak:.1%}")

  # 2. Packed vs one image per row, same tokens.
  print(f"\n[2] packed (L={args.seq_len}, {per_row} images/row, segment mask) vs one image per "
        f"row (L={args.image_tokens}), {args.rows * per_row} images, forward + backward")
  heads, head_dim = size.num_heads, size.width // size.num_heads
  key = jax.random.key(2)
  qkv = jax.random.normal(key, (3, args.rows, args.seq_len, heads, head_dim), jnp.float32)
  qkv_rows = qkv.reshape(3, args.rows * per_row, args.image_tokens, heads, head_dim)
  unpacked = packed_batch(args.rows * per_row, args.image_tokens, args.image_tokens, patch_dim)
  t_attn_packed, t_attn_rows = _time_pair(
      (attention_step(packed["segment_ids"]), tuple(qkv)),
      (attention_step(unpacked["segment_ids"]), tuple(qkv_rows)),
      repeats=5 * args.repeats)  # cheap and noisy: more repeats
  print(f"  attention only: packed {t_attn_packed * 1e3:.1f} ms, per row "
        f"{t_attn_rows * 1e3:.1f} ms, ratio {t_attn_packed / t_attn_rows:.2f} "
        f"(score entries ratio {args.seq_len // args.image_tokens})")
  step_rows, state_rows = tower_step(make_tower())
  t_packed, t_rows = _time_pair((step, (state, packed)), (step_rows, (state_rows, unpacked)),
                                repeats=args.repeats)
  flops_rows = analytic_flops(args.variant, args.rows * per_row, args.image_tokens, 1)
  print(f"  whole tower: packed {t_packed * 1e3:.0f} ms, per row {t_rows * 1e3:.0f} ms, "
        f"ratio {t_packed / t_rows:.2f} (analytic FLOP ratio {flops / flops_rows:.2f})")


if __name__ == "__main__":
  main()
