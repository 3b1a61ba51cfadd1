"""Attention backends on GPU: forward + backward time with and without segment ids, and
equality with the "xla" reference. Prints figures; not a test.

  .venv/bin/python bench/attention_gpu.py              # on a GPU machine
  .venv/bin/python bench/attention_gpu.py --repeats 5

On GPU, for S/16-like shapes (B = 32 rows, L = 256 and 1024 tokens, H = 6 and 12 heads,
Dh = 64, bf16) and each backend (xla, cudnn, pallas_gpu) it times a jitted
forward + backward (gradients w.r.t. q, k and v) of
  packed  rows packed with images of 16..L/2 tokens plus under 16 tokens of padding,
          segment-masked;
  plain   the same arrays with no segment ids at all (no mask, no bias): the kernel's best
          case, so packed / plain is what the segment ids cost;
and checks the packed outputs and gradients against the xla reference (largest error
relative to the largest reference value; bf16 inputs). It exits 1 if a backend disagrees.

Without a GPU it says so, times the xla backend (f32: this CPU has no bf16 units) at
B = 32, L = 256, H = 6, and checks the Pallas kernels in interpret mode on one tiny shape
(their times there are of the interpreter, not of the kernels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from navit_clip import attention_pallas_gpu
from navit_clip.attention import attention

GPU_BACKENDS = ("xla", "cudnn", "pallas_gpu")
TOLERANCE = 3e-2  # bf16 inputs; errors relative to the largest reference value


def packed_segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
  """int32 [B, L]: each row filled with images of 16..L/2 tokens (the last one cut to the
  space left) while 16 tokens fit; the rest, under 16 tokens, is padding (0)."""
  out = np.zeros((batch, length), np.int32)
  for row in out:
    start, image = 0, 1
    while length - start >= 16:
      n = min(int(rng.integers(16, length // 2 + 1)), length - start)
      row[start:start + n] = image
      start, image = start + n, image + 1
  return out


def inputs(batch: int, length: int, heads: int, head_dim: int, dtype, seed: int = 0):
  """q, k, v [B, L, H, Dh] of `dtype`, cotangent weights w (f32) and int32 segment ids."""
  rng = np.random.default_rng(seed)
  q, k, v, w = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
                for _ in range(4))
  seg = jnp.asarray(packed_segments(rng, batch, length))
  return q, k, v, w.astype(jnp.float32), seg


def plain_attention(backend: str):
  """The backend's kernel with no segment ids: (q, k, v) -> [B, L, H, Dh]."""
  if backend == "pallas_gpu":
    def run(q, k, v):
      return attention_pallas_gpu.triton_attention.mha(
          q, k, v, None, sm_scale=q.shape[-1] ** -0.5,
          interpret=jax.default_backend() == "cpu")
    return run
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=backend)


def packed_attention(backend: str, seg: jax.Array):
  return lambda q, k, v: attention(q, k, v, seg, seg, backend=backend)


def forward_backward(fn, w: jax.Array):
  """jit of (q, k, v) -> (output, (dq, dk, dv)) for the loss sum(output * w)."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return (out.astype(jnp.float32) * w).sum(), out
  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  return jax.jit(lambda q, k, v: grad(q, k, v)[::-1])


def median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def max_error(got, want) -> float:
  """Largest |got - want| over the tree, relative to the largest |want|."""
  errors = [float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max())
            for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  return max(errors)


def compare(backends, batch, length, heads, head_dim, dtype, repeats, *, time_plain=True):
  """Prints one line per backend; returns the backends whose packed results disagree."""
  q, k, v, w, seg = inputs(batch, length, heads, head_dim, dtype)
  real = float((seg > 0).mean())
  print(f"B={batch} L={length} H={heads} Dh={head_dim} {jnp.dtype(dtype).name}: "
        f"{int(seg.max(1).mean())} images a row on average, {1 - real:.1%} padding")
  # The reference in f32 on the same (rounded) inputs.
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = forward_backward(packed_attention("xla", seg), w)(*f32)
  bad, base = [], None
  for backend in backends:
    packed = forward_backward(packed_attention(backend, seg), w)
    error = max_error(packed(q, k, v), want)
    t_packed = median_seconds(packed, (q, k, v), repeats)
    base = base or t_packed
    line = (f"  {backend:10s} packed {t_packed * 1e3:9.2f} ms  ({t_packed / base:5.2f}x xla)"
            f"  max error {error:.1e}")
    if time_plain:
      t_plain = median_seconds(forward_backward(plain_attention(backend), w), (q, k, v),
                               repeats)
      line += f"  plain {t_plain * 1e3:9.2f} ms  packed/plain {t_packed / t_plain:5.2f}"
    if error > TOLERANCE:
      line += "  MISMATCH"
      bad.append(backend)
    print(line, flush=True)
  return bad


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  platform = jax.default_backend()
  print(f"devices: {jax.devices()}")
  bad = []
  if platform == "gpu":
    for length in (256, 1024):
      for heads in (6, 12):
        bad += compare(GPU_BACKENDS, 32, length, heads, 64, jnp.bfloat16, args.repeats)
  else:
    print(f"no GPU present (platform {platform!r}): timing the xla backend only, and "
          "checking the Pallas kernels in interpret mode on a tiny shape")
    bad += compare(("xla",), 32, 256, 6, 64, jnp.float32, min(args.repeats, 3))
    kernels = ("splash", "pallas_gpu") if platform == "cpu" else ("splash",)
    bad += compare(("xla", *kernels), 2, 128, 2, 64, jnp.float32, 1, time_plain=False)
  if bad:
    print(f"backends that disagree with xla: {sorted(set(bad))}")
    sys.exit(1)


if __name__ == "__main__":
  main()
