"""Attention backends on GPU, alone and inside the B/16 SigLIP train step. Prints figures;
not a test.

  .venv/bin/python bench/attention_gpu.py              # on a GPU machine (meant for < 5 min)
  .venv/bin/python bench/attention_gpu.py --repeats 5 --step-backends xla,cudnn,pallas_gpu

1. Attention alone. On GPU, at NaViT-B/16's packed shapes (H = 12 heads of Dh = 64, bf16;
   256 rows of L = 256 tokens, and 64 rows of L = 1024) and for each backend (xla, cudnn,
   pallas_gpu) it times a jitted forward + backward (gradients w.r.t. q, k and v) of
     packed  rows packed with images of 16..L/2 tokens plus under 16 tokens of padding,
             segment-masked;
     plain   the same arrays with no segment ids at all (no mask, no bias): the kernel's
             best case, so packed / plain is what the segment ids cost;
   and checks the packed outputs and gradients against the xla reference (largest error
   relative to the largest reference value; bf16 inputs). It exits 1 if a backend disagrees.
2. The train step. navit_clip.train's step (`make_train_step`, jitted with the trainer's
   shardings on the mesh "data:-1") for configs/siglip_navit_b16 (bf16 compute, remat
   "dots", scanned layers, AdamW) on `--rows` rows of L = 256 holding images of h x w
   patches, h, w ~ U(4, 11) (about 4.5 a row), each with a 64-token caption, once per
   backend of `--step-backends` (default cudnn and pallas_gpu; the text tower, which runs on
   every caption slot, filled or not, always uses xla). It prints the compile time,
   the median step time, images/s and MFU: model FLOPs / step time / the device's dense bf16
   peak (PEAK_FLOPS by device_kind, else a measured bf16 matmul rate). Model FLOPs are XLA's
   count for the same step with the "xla" backend, lowered but not compiled (the custom calls
   of cudnn and Pallas count no FLOPs), so every backend's MFU has the same numerator, with
   attention counted densely over all L x L pairs of a row.

Without a GPU it says so and runs a tiny version of both: the xla backend (f32: this CPU
has no bf16 units) at B = 8, L = 256, H = 12, the Pallas kernels in interpret mode on one
tiny shape (their times are of the interpreter, not of the kernels), and the train step of
a 2-layer, 64-wide tower pair on 4 rows with the xla backend (its MFU against a measured f32
matmul rate).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from navit_clip import attention_pallas_gpu, sharding
from navit_clip.attention import attention
from navit_clip.config_loading import load_config
from navit_clip.data import pipeline
from navit_clip.data.batch import device_fields
from navit_clip.flops import compiled_flops, measure_matmul_peak
from navit_clip.model import build_model
from navit_clip.optim import frozen_mask, make_optimizer, make_schedule, split_frozen
from navit_clip.train import make_train_step

GPU_BACKENDS = ("xla", "cudnn", "pallas_gpu")
GPU_SHAPES = ((256, 256), (64, 1024))  # (rows, L) of the attention-only timings
B16_HEADS, B16_HEAD_DIM = 12, 64
TOLERANCE = 3e-2  # bf16 inputs; errors relative to the largest reference value
STEP_CONFIG = "siglip_navit_b16"
# Dense bf16 FLOP/s by device_kind; the first name found in the device's kind wins.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))


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


def peak_flops(platform: str) -> tuple[float, str]:
  """(FLOP/s, where it comes from): PEAK_FLOPS for a known device, else measured."""
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak, f"{kind}, dense bf16 datasheet peak"
  if platform == "cpu":
    return measure_matmul_peak(1024), "measured f32 1024^3 matmul (no bf16 units on CPU)"
  return measure_matmul_peak(8192, jnp.bfloat16), f"{kind}, measured bf16 8192^3 matmul"


def step_config(rows: int, tiny: bool):
  """configs/siglip_navit_b16 with `rows` rows; `tiny`: 2-layer, 64-wide towers."""
  config = load_config(f"{STEP_CONFIG}:{rows}")
  if tiny:
    config.model.image.variant = "w64-d2-m128-h2/16"
    config.model.text.variant = "w64-d2-m128-h2"
    config.model.text.vocab_size, config.model.text.max_len = 1000, 16
  return config


def step_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A packed batch of `config`'s spec: rows filled with images of h x w patches, h, w ~
  U(4, 11), while one fits and a slot is free; each image has a full-length caption."""
  spec = pipeline.batch_spec(config)
  rng = np.random.default_rng(seed)
  batch = spec.zeros()
  batch["patches"] = rng.integers(0, 256, batch["patches"].shape, dtype=np.uint8)
  vocab, eos = config.model.text.vocab_size, config.model.text.eos_id
  for r in range(spec.batch_size):
    start = 0
    for slot in range(spec.max_images):
      h, w = rng.integers(4, 12, 2)
      if start + h * w > spec.seq_len:
        break
      rows = slice(start, start + h * w)
      batch["segment_ids"][r, rows] = slot + 1
      batch["positions"][r, rows] = np.stack(np.divmod(np.arange(h * w), w), -1)
      batch["grid_hw"][r, rows] = (h, w)
      batch["image_mask"][r, slot] = True
      batch["text_tokens"][r, slot, :-1] = rng.integers(2, vocab, spec.text_len - 1)
      batch["text_tokens"][r, slot, -1] = eos
      start += h * w
  return device_fields(batch)


def jitted_step(config, backend: str, params, mesh):
  """(step, init): navit_clip.train's step for `config` with image attention `backend`,
  jitted with the trainer's shardings; init: params (pure dict) -> the initial state
  {"params", "opt_state", "step"}, as the trainer makes it."""
  config = config.copy_and_resolve_references()
  config.model.image.attention = backend
  abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
  total = config.train.total_steps
  tx = make_optimizer(config.optim, params, total)
  frozen = frozen_mask(config.optim, params)
  step = make_train_step(graphdef, rest, tx, make_schedule(config.optim, total), 1, frozen)

  def init_state(params):
    return {"params": params, "opt_state": tx.init(split_frozen(params, frozen)[0]),
            "step": jnp.zeros((), jnp.int32)}

  shardings = sharding.state_shardings(jax.eval_shape(init_state, params), mesh,
                                       config.sharding)
  jitted = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return jitted, jax.jit(init_state, out_shardings=shardings)


def time_step(compiled, state, batch, repeats: int) -> float:
  """Median seconds of `repeats` steps after two warm-up steps (`state` is donated)."""
  times = []
  for i in range(repeats + 2):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def train_steps(backends, rows: int, repeats: int, platform: str) -> None:
  """Prints one line per backend: compile time, step time, images/s and MFU."""
  tiny = platform != "gpu"
  config = step_config(rows, tiny)
  mesh = sharding.make_mesh("data:-1")
  host = step_batch(config)
  batch = sharding.global_batch(host, mesh, rows)
  images = int(host["image_mask"].sum())
  params = nnx.to_pure_dict(nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param,
                                      ...)[1])
  peak, peak_source = peak_flops(platform)
  peak *= mesh.size  # the step runs on every device of the mesh
  with jax.set_mesh(mesh):  # lowered, not compiled: XLA's count with xla attention
    step, init = jitted_step(config, "xla", params, mesh)
    flops = compiled_flops(step.lower(jax.eval_shape(init, params), batch))
  size = config.model.image.variant + (" (tiny)" if tiny else "")
  print(f"\ntrain step: {STEP_CONFIG}, image tower {size}, {rows} rows x L="
        f"{config.data.seq_len}, {images / rows:.2f} images a row ({images} images), "
        f"{config.model.text.max_len}-token captions, {config.model.image.dtype}; the text "
        f"tower encodes all {host['image_mask'].size} caption slots")
  print(f"peak {peak / 1e12:.3g} TFLOP/s on {mesh.size} device(s) ({peak_source}); model "
        f"FLOPs {flops:.3e} a step (XLA count, xla attention)")
  for backend in backends:
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      step, init = jitted_step(config, backend, params, mesh)
      state = init(params)
      compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    seconds = time_step(compiled, state, batch, repeats)
    print(f"  {backend:10s} compile {compile_s:6.1f} s  step {seconds * 1e3:9.1f} ms  "
          f"{images / seconds:9.1f} images/s  MFU {flops / seconds / peak:6.1%}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--rows", type=int, default=256, help="train-step batch rows (GPU)")
  parser.add_argument("--step-backends", default="cudnn,pallas_gpu",
                      help="comma-separated attention backends of the train step (GPU)")
  args = parser.parse_args()
  platform = jax.default_backend()
  print(f"devices: {jax.devices()}")
  bad, start = [], time.perf_counter()
  if platform == "gpu":
    for rows, length in GPU_SHAPES:
      bad += compare(GPU_BACKENDS, rows, length, B16_HEADS, B16_HEAD_DIM, jnp.bfloat16,
                     args.repeats)
    train_steps(args.step_backends.split(","), args.rows, args.repeats, platform)
  else:
    print(f"no GPU present (platform {platform!r}): timing the xla backend only, checking "
          "the Pallas kernels in interpret mode on a tiny shape, and a tiny train step")
    bad += compare(("xla",), 8, 256, B16_HEADS, B16_HEAD_DIM, jnp.float32,
                   min(args.repeats, 3))
    kernels = ("splash", "pallas_gpu") if platform == "cpu" else ("splash",)
    bad += compare(("xla", *kernels), 2, 128, 2, 64, jnp.float32, 1, time_plain=False)
    train_steps(("xla",), 4, min(args.repeats, 3), platform)
  print(f"\ndone in {time.perf_counter() - start:.0f} s")
  if bad:
    print(f"backends that disagree with xla: {sorted(set(bad))}")
    sys.exit(1)


if __name__ == "__main__":
  main()
