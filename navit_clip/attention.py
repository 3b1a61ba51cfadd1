"""Segment-masked multi-head attention: one function, several backends.

A token attends to exactly the tokens that share its segment id. Padding tokens (id 0)
attend among themselves, so no softmax row is ever fully masked (no NaN) and padding never
mixes with an image. With `causal=True` a query at position i also sees only keys at
positions j <= i (text towers). Every backend is tested equal to the "xla" reference.

Backends (`BACKENDS`):
  xla         jax.nn.dot_product_attention with a boolean [B, 1, Lq, Lk] mask (reference;
              any platform).
  cudnn       jax.nn.dot_product_attention(implementation="cudnn") with the same mask, which
              cuDNN receives as a dense additive bias (correct, O(Lq * Lk) memory per row).
              cuDNN takes bf16/fp16 only: other inputs are cast to bf16 and the output cast
              back. Needs a CUDA GPU with cuDNN.
  pallas_gpu  the Pallas-Triton flash-attention kernel with segment ids (GPU; self-attention
              only, see navit_clip.attention_pallas_gpu).
  splash      Pallas splash attention with SegmentIds (TPU; see navit_clip.attention_splash).
  blocked     only the blocks of queries and keys that share a segment id, skipped with
              lax.cond (any platform; for CPU, where it is several times faster than xla on
              packed rows; see navit_clip.attention_blocked).
"auto" (`CHOICES`) picks splash on TPU, cudnn on GPU and xla on CPU (`resolve_backend`).

Platforms: a backend runs on its own platform, and the Pallas kernels also run on CPU in
interpret mode (slow but exact: for tests). Anything else raises a RuntimeError naming the
backend and the platform; no backend ever falls back to another.

Meshes: the compiler cannot partition a Pallas kernel, so on a multi-device mesh it would
gather the global q, k and v onto every device. Under the mesh that `jax.set_mesh` set, the
Pallas backends (and blocked, whose loop over rows and blocks the compiler would not split
either) therefore run inside `jax.shard_map` (`local_split`): each device calls the
kernel on its own rows (split over the batch axes ("data", "fsdp")) and, with tensor
parallelism, its own heads (split over "model", as the column-parallel q/k/v projections of
navit_clip.sharding leave them). xla and cudnn are partitioned by the compiler (cudnn through
its custom partitioning rule) and run as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from navit_clip.activation_sharding import BATCH_AXES
from navit_clip.choices import check_choice

BACKENDS = ("xla", "cudnn", "pallas_gpu", "splash", "blocked")
CHOICES = ("auto", *BACKENDS)
AUTO = {"tpu": "splash", "gpu": "cudnn", "cpu": "xla"}  # platform -> backend for "auto"
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

# The platform each accelerator backend needs; the Pallas kernels also run on CPU in
# interpret mode.
_NATIVE = {"cudnn": "gpu", "pallas_gpu": "gpu", "splash": "tpu"}
_INTERPRETED = ("pallas_gpu", "splash")
HEAD_AXIS = "model"  # the mesh axis that splits attention heads (tensor parallelism)


def resolve_backend(name: str, platform: str | None = None) -> str:
  """The backend that `name` means on `platform` (default: jax.default_backend()).

  "auto" becomes AUTO[platform]; a name in BACKENDS is returned as it is. Raises ValueError
  for any other name.
  """
  if name == "auto":
    platform = platform or jax.default_backend()
    if platform not in AUTO:
      raise ValueError(f"attention backend 'auto' knows no backend for platform "
                       f"{platform!r}; choose one of {BACKENDS}")
    return AUTO[platform]
  check_choice("attention backend", name, CHOICES)
  return name


def check_platform(backend: str, platform: str) -> None:
  """Raises RuntimeError if `backend` (one of BACKENDS) cannot run on `platform`."""
  native = _NATIVE.get(backend)
  if native is None or platform == native or (platform == "cpu" and backend in _INTERPRETED):
    return
  also = " (or cpu, interpreted, for tests)" if backend in _INTERPRETED else ""
  raise RuntimeError(f"attention backend {backend!r} cannot run on platform {platform!r}: it "
                     f"needs {native}{also}; choose 'xla', or 'auto' "
                     f"(here {AUTO.get(platform, 'xla')!r})")


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, *,
                 causal: bool = False) -> jax.Array:
  """bool [B, 1, Lq, Lk]: True where query and key share a segment id.

  With `causal`, also False where the key position j is after the query position i (j > i).
  """
  mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  if causal:
    mask &= jnp.tril(jnp.ones((q_segment_ids.shape[-1], kv_segment_ids.shape[-1]), jnp.bool_))
  return mask


@dataclasses.dataclass(frozen=True)
class LocalSplit:
  """How a Pallas kernel's inputs split over the mesh: what each device runs on.

  qkv: PartitionSpec of q, k, v and the output [B, L, H, Dh] (rows, -, heads, -).
  segments: PartitionSpec of the segment ids [B, L].
  axes: the mesh axes the shard_map makes manual (every axis not manual already).
  """

  qkv: PartitionSpec
  segments: PartitionSpec
  axes: frozenset[str]


def local_split(batch: int, heads: int) -> LocalSplit | None:
  """The split of [batch, L, heads, Dh] inputs over the current mesh; None: run unsplit.

  Rows go over the batch axes ("data", "fsdp") whose sizes divide `batch` (in that order),
  heads over "model" when its size divides `heads`. None without a mesh, on a mesh of one
  device, or when no axis splits anything.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  free = {a: n for a, n in mesh.shape.items() if a not in mesh.manual_axes}
  rows, row_shards = [], 1
  for axis in BATCH_AXES:
    size = free.get(axis, 1)
    if size > 1 and batch % (row_shards * size) == 0:
      rows.append(axis)
      row_shards *= size
  head_shards = free.get(HEAD_AXIS, 1)
  head_axis = HEAD_AXIS if head_shards > 1 and heads % head_shards == 0 else None
  if not rows and head_axis is None:
    return None
  row_spec = tuple(rows) or None
  return LocalSplit(PartitionSpec(row_spec, None, head_axis, None),
                    PartitionSpec(row_spec, None), frozenset(free))


def _on_local_shards(kernel: Callable, q, k, v, q_segment_ids, kv_segment_ids):
  """`kernel(q, k, v, q_segment_ids, kv_segment_ids)` with each device on its own shard.

  Without a split (`local_split` is None) the kernel runs on the arrays as they are. One
  segment-id array passed twice (self-attention) reaches the kernel as one array twice.
  """
  split = local_split(q.shape[0], q.shape[2]) if q.ndim == 4 else None  # else: kernel says
  if split is None:
    return kernel(q, k, v, q_segment_ids, kv_segment_ids)
  segments = ((q_segment_ids,) if kv_segment_ids is q_segment_ids
              else (q_segment_ids, kv_segment_ids))

  def local(q, k, v, *segments):
    return kernel(q, k, v, segments[0], segments[-1])

  in_specs = (split.qkv,) * 3 + (split.segments,) * len(segments)
  # check_vma=False: the Pallas kernels declare no per-device variance of their outputs.
  return jax.shard_map(local, in_specs=in_specs, out_specs=split.qkv, axis_names=split.axes,
                       check_vma=False)(q, k, v, *segments)


def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal):
  mask = segment_mask(q_segment_ids, kv_segment_ids, causal=causal)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal):
  """cuDNN fused attention; f32 inputs run in bf16 (cuDNN's softmax accumulates in f32)."""
  mask = segment_mask(q_segment_ids, kv_segment_ids, causal=causal)
  dtype = q.dtype if q.dtype in CUDNN_DTYPES else jnp.bfloat16
  out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                     mask=mask, implementation="cudnn")
  return out.astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, *, backend: str = "xla",
              causal: bool = False) -> jax.Array:
  """Scaled dot-product attention restricted to equal segment ids.

  Args:
    q: [B, Lq, H, Dh] queries; k, v: [B, Lk, H, Dh], all of one float dtype; softmax runs
      in f32. "cudnn" computes f32 inputs in bf16 (see the module docstring).
    q_segment_ids: int32 [B, Lq]; kv_segment_ids: int32 [B, Lk]. 0 marks padding.
    backend: one of CHOICES ("auto" is resolved by `resolve_backend`).
    causal: also mask keys after the query position (self-attention; every backend but
      "splash").
  Returns:
    [B, Lq, H, Dh] in q's dtype.
  Raises:
    ValueError: unknown backend, or shapes/options the backend does not support.
    RuntimeError: the backend cannot run on this platform (`check_platform`).
  """
  platform = jax.default_backend()
  backend = resolve_backend(backend, platform)
  check_platform(backend, platform)
  if backend == "xla":
    return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)
  if backend == "cudnn":
    return _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)
  if backend == "blocked":
    from navit_clip import attention_blocked
    kernel = functools.partial(attention_blocked.blocked_attention, causal=causal)
    return _on_local_shards(kernel, q, k, v, q_segment_ids, kv_segment_ids)
  interpret = platform == "cpu"
  if backend == "pallas_gpu":
    from navit_clip import attention_pallas_gpu  # Pallas import only when asked for
    kernel = functools.partial(attention_pallas_gpu.pallas_gpu_attention, causal=causal,
                               interpret=interpret)
  else:
    if causal:
      raise ValueError("causal attention is not implemented by the 'splash' backend; use "
                       "'xla', 'cudnn' or 'pallas_gpu'")
    from navit_clip import attention_splash  # Pallas import only when asked for
    kernel = functools.partial(attention_splash.splash_attention, interpret=interpret)
  return _on_local_shards(kernel, q, k, v, q_segment_ids, kv_segment_ids)
