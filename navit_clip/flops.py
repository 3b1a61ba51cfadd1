"""FLOP accounting: a matmul peak measured on this device, and FLOPs of a compiled step.

Model FLOPs utilisation (MFU) = step FLOPs / step time / peak. The peak is either given
(a known accelerator's datasheet figure) or measured once at start with a large matmul in
the training dtype, which is the honest ceiling on CPUs and unknown devices.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of the fastest of `repeats` n x n x n matmuls on the default device."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
  mm = jax.jit(jnp.dot)
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def compiled_flops(compiled) -> float:
  """FLOPs that XLA's cost analysis counts for one call of a compiled function."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per device
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))
