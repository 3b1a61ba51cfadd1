"""Segment-masked attention: the xla reference against a NumPy oracle, every backend against
xla (values and gradients) wherever it can run, and the platform rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from navit_clip import attention_pallas_gpu, attention_splash
from navit_clip.attention import (AUTO, BACKENDS, attention, check_platform,
                                  resolve_backend)

PLATFORM = jax.default_backend()
ON_CPU = PLATFORM == "cpu"


def _segments(rng: np.random.Generator, batch: int, length: int, max_segments: int):
  """Random packed layouts: runs of ids 1..k (k <= max_segments), then padding (id 0)."""
  out = np.zeros((batch, length), np.int32)
  for b in range(batch):
    n = int(rng.integers(1, max_segments + 1))
    cuts = np.sort(rng.choice(np.arange(1, length), size=n, replace=False))
    ids = np.zeros(length, np.int32)
    start = 0
    for k, end in enumerate(cuts, start=1):  # segment k covers [start, end); rest is padding
      ids[start:end] = k
      start = end
    out[b] = ids
  return jnp.asarray(out)


def _packed_layouts(length: int):
  """int32 [4, L] (L >= 128), the layouts a packer makes and the edge cases of the contract.

  Rows: one image filling the row; no image (all padding); 40 images of 1..4 tokens (100 in all), then
  padding; 24 one-token images, one long image, then padding.
  """
  rows = np.zeros((4, length), np.int32)
  rows[0] = 1
  sizes = np.resize(np.arange(1, 5), 40)
  rows[2, :sizes.sum()] = np.repeat(np.arange(1, 41), sizes)
  rows[3, :24] = np.arange(1, 25)
  rows[3, 24:length - 9] = 25
  assert rows[2, -1] == 0 and rows[3, -1] == 0  # both end in padding
  return jnp.asarray(rows)


def _qkv(rng: np.random.Generator, batch: int, length: int, heads: int, dim: int,
         dtype=jnp.float32):
  return [jnp.asarray(rng.normal(size=(batch, length, heads, dim)), dtype) for _ in range(3)]


def _numpy_attention(q, k, v, seg):
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  mask = seg[:, None, :, None] == seg[:, None, None, :]
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _max_error(got, want) -> float:
  """Largest absolute difference relative to the largest |want|."""
  got, want = np.float64(got), np.float64(want)
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_xla_reference_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng, 3, 24, 2, 8)
  seg = _segments(rng, 3, 24, 5)
  got = attention(q, k, v, seg, seg, backend="xla")
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, seg), atol=1e-5, rtol=1e-5)


def test_other_segments_do_not_leak():
  rng = np.random.default_rng(1)
  q, k, v = _qkv(rng, 1, 16, 2, 4)
  seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4], jnp.int32)
  base = attention(q, k, v, seg, seg)
  other = (seg != 1)[..., None, None]
  noisy = attention(q, jnp.where(other, k * 3 + 1, k), jnp.where(other, -v, v), seg, seg)
  np.testing.assert_array_equal(base[:, :5], noisy[:, :5])


# Backends compared with the reference on this machine: the Pallas kernels run natively on
# their platform and in interpret mode on CPU; cuDNN needs a GPU.
_RUNNABLE = {"splash": PLATFORM in ("tpu", "cpu"), "pallas_gpu": PLATFORM in ("gpu", "cpu"),
             "cudnn": PLATFORM == "gpu"}
KERNELS = [pytest.param(b, marks=pytest.mark.skipif(
    not _RUNNABLE[b], reason=f"the {b!r} backend cannot run on platform {PLATFORM!r}"))
           for b in ("splash", "pallas_gpu", "cudnn")]


def _tolerance(backend: str, dtype) -> float:
  """Error allowed relative to the largest reference value.

  Interpret mode is exact up to f32 rounding; on accelerators f32 matmuls may run in TF32
  (the reference's too), and cuDNN computes in bf16.
  """
  if backend == "cudnn" or dtype == jnp.bfloat16:
    return 3e-2
  return 2e-5 if ON_CPU else 1e-2


def _reference_and_power(q, k, v, seg, causal, tol):
  """The xla reference, after checking that ignoring the segment ids would fail the test."""
  want = attention(q, k, v, seg, seg, backend="xla", causal=causal)
  ones = jnp.ones_like(seg)
  unsegmented = attention(q, k, v, ones, ones, backend="xla", causal=causal)
  assert _max_error(unsegmented, want) > 10 * tol, "layout too weak to catch ignored ids"
  return want


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["packed", "random"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backend_matches_xla(backend, layout, dtype):
  length = 256
  rng = np.random.default_rng(7)
  seg = _packed_layouts(length) if layout == "packed" else _segments(rng, 2, length, 12)
  q, k, v = _qkv(rng, seg.shape[0], length, 2, 16, dtype)
  tol = _tolerance(backend, dtype)
  want = _reference_and_power(*(x.astype(jnp.float32) for x in (q, k, v)), seg, False, tol)
  got = attention(q, k, v, seg, seg, backend=backend)
  assert got.shape == want.shape and got.dtype == dtype
  assert _max_error(got, want) <= tol


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_backend_gradients_match_xla(backend, causal):
  if causal and backend == "splash":
    pytest.skip("splash has no causal mode")
  rng = np.random.default_rng(3)
  seg = _packed_layouts(128)
  q, k, v = _qkv(rng, seg.shape[0], 128, 2, 16)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  tol = _tolerance(backend, jnp.float32)
  _reference_and_power(q, k, v, seg, causal, tol)

  def loss(backend):
    return lambda q, k, v: (attention(q, k, v, seg, seg, backend=backend,
                                      causal=causal) * w).sum()

  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(backend), argnums=(0, 1, 2))(q, k, v)
  for g, r, name in zip(got, want, "qkv"):
    assert g.dtype == r.dtype, f"d{name}"
    assert _max_error(g, r) <= tol, f"d{name}"


@pytest.mark.parametrize("backend", [b for b in KERNELS if b.values[0] != "splash"])
def test_causal_backend_matches_xla(backend):
  rng = np.random.default_rng(8)
  seg = _segments(rng, 2, 128, 6)
  q, k, v = _qkv(rng, 2, 128, 2, 16)
  tol = _tolerance(backend, jnp.float32)
  want = _reference_and_power(q, k, v, seg, True, tol)
  assert _max_error(attention(q, k, v, seg, seg, backend="xla"), want) > 10 * tol
  got = attention(q, k, v, seg, seg, backend=backend, causal=True)
  assert _max_error(got, want) <= tol


def test_splash_block_size_choice_and_error():
  assert attention_splash.block_size(128) == 128
  assert attention_splash.block_size(384) == 128
  assert attention_splash.block_size(768) == 256
  assert attention_splash.block_size(1024) == 512
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 1, 96, 2, 8)
  seg = jnp.ones((1, 96), jnp.int32)
  with pytest.raises(ValueError, match="multiple of 128, got 96"):
    attention_splash.splash_attention(q, k, v, seg, seg, interpret=True)


def test_pallas_gpu_rejects_what_it_cannot_do():
  rng = np.random.default_rng(6)
  q, k, v = _qkv(rng, 1, 128, 2, 8)
  seg = jnp.ones((1, 128), jnp.int32)
  run = attention_pallas_gpu.pallas_gpu_attention
  with pytest.raises(ValueError, match="same array"):
    run(q, k, v, seg, jnp.ones((1, 128), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="self-attention only"):
    run(q[:, :1], k, v, seg[:, :1], seg, interpret=True)
  with pytest.raises(ValueError, match="multiple of 128, got 96"):
    short = seg[:, :96]
    run(q[:, :96], k[:, :96], v[:, :96], short, short, interpret=True)


def test_platform_rules():
  for platform in ("cpu", "gpu", "tpu"):
    check_platform("xla", platform)
  for backend, platform in (("pallas_gpu", "gpu"), ("pallas_gpu", "cpu"), ("splash", "tpu"),
                            ("splash", "cpu"), ("cudnn", "gpu")):
    check_platform(backend, platform)
  for backend, platform in (("cudnn", "cpu"), ("cudnn", "tpu"), ("pallas_gpu", "tpu"),
                            ("splash", "gpu")):
    with pytest.raises(RuntimeError, match=f"'{backend}' cannot run on platform '{platform}'"):
      check_platform(backend, platform)


@pytest.mark.skipif(not ON_CPU, reason="checks the error raised on CPU")
def test_cudnn_on_cpu_raises_instead_of_falling_back():
  q = jnp.zeros((1, 128, 1, 8), jnp.bfloat16)
  seg = jnp.ones((1, 128), jnp.int32)
  with pytest.raises(RuntimeError, match="'cudnn' cannot run on platform 'cpu'"):
    attention(q, q, q, seg, seg, backend="cudnn")


def test_auto_resolves_per_platform():
  assert AUTO == {"tpu": "splash", "gpu": "cudnn", "cpu": "xla"}
  for platform, backend in AUTO.items():
    assert resolve_backend("auto", platform) == backend
  assert resolve_backend("auto") == AUTO[PLATFORM]
  for backend in BACKENDS:
    assert resolve_backend(backend, "cpu") == backend
  with pytest.raises(ValueError, match="platform 'metal'"):
    resolve_backend("auto", "metal")


def test_unknown_backend_is_named():
  q = jnp.zeros((1, 4, 1, 2))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="'flash'"):
    attention(q, q, q, seg, seg, backend="flash")
