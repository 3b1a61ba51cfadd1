"""The Pallas attention kernels on a multi-device mesh: each device runs the kernel on its own
rows (and heads), the results equal the xla reference, and the compiled programs gather no
q, k or v.

The checks run this file as a script in a subprocess with 8 fake CPU devices (the pytest
process has already started JAX with one); the kernels run in Pallas interpret mode.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from navit_clip import sharding
from navit_clip.attention import local_split

MESHES = ("data:8", "data:2,fsdp:4", "data:2,fsdp:2,model:2")
KERNELS = ("splash", "pallas_gpu")
ROWS, SEQ, HEADS, HEAD_DIM = 8, 128, 2, 16  # q, k, v [ROWS, SEQ, HEADS, HEAD_DIM]
TOLERANCE = 2e-5  # interpret mode is exact up to f32 rounding; relative to the largest value


def _abstract_mesh(data=1, fsdp=1, model=1):
  return AbstractMesh((data, fsdp, model), sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def test_local_split_follows_the_mesh():
  assert local_split(8, 4) is None  # no mesh
  with jax.sharding.use_abstract_mesh(_abstract_mesh()):
    assert local_split(8, 4) is None  # one device
  with jax.sharding.use_abstract_mesh(_abstract_mesh(data=2, fsdp=4)):
    split = local_split(8, 4)
    assert split.qkv == P(("data", "fsdp"), None, None, None)
    assert split.segments == P(("data", "fsdp"), None)
    assert split.axes == frozenset(sharding.MESH_AXES)
    assert local_split(2, 4).qkv == P(("data",), None, None, None)  # fsdp does not divide 2
    assert local_split(3, 4) is None  # nothing divides
  with jax.sharding.use_abstract_mesh(_abstract_mesh(data=2, model=2)):
    assert local_split(8, 4).qkv == P(("data",), None, "model", None)
    assert local_split(8, 3).qkv == P(("data",), None, None, None)  # heads stay whole
    assert local_split(1, 4).qkv == P(None, None, "model", None)


def test_qkv_gather_finder_flags_gathered_rows():
  hlo = """
  %all-gather.6 = f32[8,128,2,16]{3,2,1,0} all-gather(%get-tuple-element.215), channel_id=3
  %all-gather.2 = f32[8,2,128,16]{3,2,1,0} all-gather(%get-tuple-element.3), channel_id=4
  %all-gather.7 = s32[8,128]{1,0} all-gather(%get-tuple-element.216), channel_id=5
  %all-gather.8 = f32[32,128]{1,0} all-gather(%param.3), channel_id=6
  %ags = (f32[4,128,32]{2,1,0}, f32[8,128,32]{2,1,0}) all-gather-start(%fusion.2)
  """
  assert len(_all_gathers(hlo)) == 6
  assert _qkv_gathers(hlo, 128, 2, 16) == [("f32", (8, 128, 2, 16)), ("f32", (8, 2, 128, 16)),
                                          ("s32", (8, 128)), ("f32", (4, 128, 32)),
                                          ("f32", (8, 128, 32))]


def _run_child(what: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, __file__, what], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def attention_results():
  return _run_child("attention")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("backend", KERNELS)
def test_sharded_kernel_equals_xla_and_gathers_no_qkv(attention_results, backend, mesh):
  r = attention_results[f"{backend} {mesh}"]
  assert r["qkv_gathers"] == [], r["all_gathers"]
  assert r["error"] <= TOLERANCE


@pytest.mark.slow
def test_sharded_train_step_gathers_no_qkv():
  results = _run_child("steps")
  for mesh in MESHES:
    r = results[mesh]
    assert r["qkv_gathers"] == [], (mesh, r["all_gathers"])
    np.testing.assert_allclose(r["loss"], results["xla"]["loss"], rtol=1e-5, err_msg=mesh)
  assert results["data:2,fsdp:4"]["all_gathers"], "FSDP gathers parameters: parser finds none"


# The child process: 8 fake CPU devices.

_GATHER = re.compile(r"= (.*?) all-gather(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _all_gathers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, shape) of every all-gather result in compiled HLO text."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for result in _GATHER.findall(hlo) for dtype, dims in _SHAPE.findall(result)]


def _qkv_gathers(hlo: str, seq_len: int, heads: int, head_dim: int) -> list:
  """All-gathers whose result has the rows of q, k, v (any kernel layout) or segment ids."""
  rows = {(seq_len, heads, head_dim), (heads, seq_len, head_dim), (seq_len, heads * head_dim)}
  return [(dtype, shape) for dtype, shape in _all_gathers(hlo)
          if shape[1:] in rows or (dtype == "s32" and shape[1:] == (seq_len,))]


def _segments(rng, rows: int, length: int) -> np.ndarray:
  """int32 [rows, length]: images of 1..40 tokens, then 0..8 padding tokens (id 0)."""
  out = np.zeros((rows, length), np.int32)
  for row in out:
    start, image = 0, 1
    while start < length - 8:
      n = min(int(rng.integers(1, 41)), length - start)
      row[start:start + n] = image
      start, image = start + n, image + 1
  return out


def _mesh_sharding(mesh):
  """Rows over the batch axes and, on a tensor-parallel mesh, heads over "model"."""
  heads = "model" if mesh.shape["model"] > 1 else None
  return NamedSharding(mesh, P(("data", "fsdp"), None, heads))


def _forward_backward(backend):
  from navit_clip.attention import attention

  def loss(q, k, v, seg, w):
    out = attention(q, k, v, seg, seg, backend=backend)
    return (out * w).sum(), out

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  return lambda *args: grad(*args)[::-1]  # (out, (dq, dk, dv))


def _max_error(got, want) -> float:
  return max(float(np.abs(np.float64(g) - r).max() / np.abs(np.float64(r)).max())
             for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _child_attention() -> dict:
  """Per kernel and mesh: the error against xla on one device, and the all-gathers."""
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.normal(size=(ROWS, SEQ, HEADS, HEAD_DIM)), jnp.float32)
                for _ in range(4))
  seg = jnp.asarray(_segments(rng, ROWS, SEQ))
  want = jax.device_get(jax.jit(_forward_backward("xla"))(q, k, v, seg, w))
  out = {}
  for spec in MESHES:
    mesh = sharding.make_mesh(spec)
    qkv, rows = _mesh_sharding(mesh), sharding.batch_sharding(mesh)
    for backend in KERNELS:
      step = jax.jit(_forward_backward(backend), in_shardings=(qkv, qkv, qkv, rows, qkv))
      with jax.set_mesh(mesh):
        compiled = step.lower(q, k, v, seg, w).compile()
        got = compiled(q, k, v, seg, w)
      hlo = compiled.as_text()
      out[f"{backend} {spec}"] = {"error": _max_error(got, want),
                                  "all_gathers": _all_gathers(hlo),
                                  "qkv_gathers": _qkv_gathers(hlo, SEQ, HEADS, HEAD_DIM)}
  return out


def _step_config(backend: str):
  from navit_clip.config import default_config
  c = default_config()
  c.model.image.variant, c.model.text.variant = "mu/8", "mu"
  c.model.image.attention = backend
  c.model.image.scan_layers, c.model.image.remat = True, "dots"  # as the recipes have it
  c.model.text.vocab_size, c.model.text.max_len = 64, 8
  c.data.batch_size, c.data.seq_len, c.data.max_images = ROWS, SEQ, 6
  c.optim.warmup_steps = 0
  c.sharding.fsdp_min_size = 0
  return c


def _step_batch(config) -> dict:
  """A random packed batch of the config's spec (device fields only)."""
  from navit_clip.data import pipeline
  from navit_clip.data.batch import device_fields
  spec = pipeline.batch_spec(config)
  rng = np.random.default_rng(1)
  batch = spec.zeros()
  batch["patches"] = rng.integers(0, 256, batch["patches"].shape, dtype=np.uint8)
  for r in range(spec.batch_size):
    for k in range(1 + r % spec.max_images):
      start = 20 * k
      batch["segment_ids"][r, start:start + 20] = k + 1
      batch["positions"][r, start:start + 20] = np.stack([np.arange(20) // 5,
                                                          np.arange(20) % 5], -1)
      batch["grid_hw"][r, start:start + 20] = (4, 5)
      batch["image_mask"][r, k] = True
      batch["text_tokens"][r, k, :3] = rng.integers(2, 64, 3)
      batch["text_tokens"][r, k, 3] = config.model.text.eos_id
  return device_fields(batch)


def _step_loss_and_hlo(backend: str, mesh) -> tuple[float, str]:
  """One train step of navit_clip.train's step builder on `mesh`: (loss, compiled HLO)."""
  import jax.numpy as jnp
  from flax import nnx
  from navit_clip.model import build_model
  from navit_clip.optim import frozen_mask, make_optimizer, make_schedule
  from navit_clip.train import make_train_step

  config = _step_config(backend)
  graphdef, params, rest = nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  tx = make_optimizer(config.optim, params, 10)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  shardings = sharding.state_shardings(state, mesh, config.sharding)
  step = jax.jit(make_train_step(graphdef, rest, tx, make_schedule(config.optim, 10), 1,
                                 frozen_mask(config.optim, params)),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  batch = sharding.global_batch(_step_batch(config), mesh, ROWS)
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
    _, metrics = compiled(jax.device_put(state, shardings), batch)
  return float(metrics["loss"]), compiled.as_text()


def _child_steps() -> dict:
  """Per mesh: the splash train step's loss and all-gathers; the xla step's loss on data:8
  (the xla step on other meshes equals it: tests/test_sharding.py)."""
  out = {"xla": {"loss": _step_loss_and_hlo("xla", sharding.make_mesh("data:8"))[0]}}
  for spec in MESHES:
    loss, hlo = _step_loss_and_hlo("splash", sharding.make_mesh(spec))
    out[spec] = {"loss": loss, "all_gathers": _all_gathers(hlo),
                 "qkv_gathers": _qkv_gathers(hlo, SEQ, HEADS, HEAD_DIM)}
  return out


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 8)
  assert len(jax.devices()) == 8, jax.devices()
  run = {"attention": _child_attention, "steps": _child_steps}[sys.argv[1]]
  print(json.dumps(run()))
