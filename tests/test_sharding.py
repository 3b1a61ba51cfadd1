"""Mesh and sharding rules; a sharded train step equals the one-device step.

The multi-device checks run this file as a script in a subprocess with 8 fake CPU devices
(the pytest process has already started JAX with one).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from navit_clip import activation_sharding, sharding

MESHES = ("data:8", "data:2,fsdp:4", "data:2,fsdp:2,model:2")
# (mesh, chunked, micro-batches) of the sigmoid loss checked against one device without
# accumulation; the chunked losses are tested on every mesh in test_chunked_loss.py, here
# one runs inside the full step on the richest mesh, also with full-batch accumulation (2
# micro-batches of 4 rows, one row a batch device; dense, it is tested on one device in
# test_grad_accum.py).
STEPS = tuple((m, False, 1) for m in MESHES) + (("data:2,fsdp:2,model:2", True, 1),
                                                ("data:2,fsdp:2,model:2", True, 2))
FSDP_MESHES = ("data:8", "data:4,fsdp:2", "data:2,fsdp:4", "fsdp:8")
RTOL_LOSS = 1e-5  # relative, on each step's loss
ATOL_PARAMS = 1e-5  # absolute, on every parameter after two Adam steps of lr 1e-3 (1%)


def _abstract_mesh(data=1, fsdp=1, model=1):
  return AbstractMesh((data, fsdp, model), sharding.MESH_AXES)


def test_parse_mesh_fills_missing_axes_and_rejects_bad_specs():
  assert sharding.parse_mesh("fsdp:4,data:-1") == {"data": -1, "fsdp": 4, "model": 1}
  for bad in ("data", "batch:2", "data:2,data:2", "data:-1,fsdp:-1", "data:0", "data:x"):
    with pytest.raises(ValueError, match="mesh"):
      sharding.parse_mesh(bad)


def test_make_mesh_resolves_minus_one_and_checks_the_device_count():
  mesh = sharding.make_mesh("data:-1", jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1}
  with pytest.raises(ValueError, match="there are 1"):
    sharding.make_mesh("data:2", jax.devices()[:1])


def test_rules_give_tensor_parallel_and_fsdp_axes():
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  mesh = _abstract_mesh(data=2, fsdp=4, model=2)

  def spec(name, shape, min_size=0):
    return sharding.partition_spec(name, shape, mesh, rules, min_size)

  fc1 = "params/image/encoder/blocks/0/mlp/fc1/kernel"
  assert spec(fc1, (32, 128)) == P("fsdp", "model")
  assert spec("params/text/encoder/blocks/0/mlp/fc2/kernel", (128, 32)) == P("model", "fsdp")
  assert spec("params/image/encoder/blocks/0/attn/query/kernel", (32, 32)) == P("fsdp", "model")
  assert spec("params/text/embed/embedding", (64, 32)) == P("fsdp", None)  # largest dim
  assert spec("params/text/embed/embedding", (30, 32)) == P(None, "fsdp")  # divisible one
  assert spec("params/image/encoder/norm/scale", (6,)) == P(None)  # nothing divides
  assert spec("params/logit_scale", ()) == P()
  assert spec(fc1, (32, 128), min_size=10_000) == P(None, "model")  # small: no FSDP
  # Scanned layers: the rule names the trailing dims, the depth axis stays whole.
  assert spec("params/image/encoder/blocks/mlp/fc1/kernel", (12, 32, 128)) == P(
      None, "fsdp", "model")
  # Optimizer state is named after its parameter; factored statistics skip the rule.
  assert spec(f"opt_state/0/inner_state/1/mu/{fc1[7:]}", (32, 128)) == P("fsdp", "model")
  assert spec(f"opt_state/0/v_row/{fc1[7:]}", (32,)) == P("fsdp")
  with pytest.raises(ValueError, match="fc1/kernel.*does not divide"):
    spec(fc1, (32, 127))


def test_axes_of_size_one_shard_nothing():
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  spec = sharding.partition_spec("params/image/encoder/blocks/0/mlp/fc1/kernel", (32, 127),
                                 _abstract_mesh(data=8), rules, 0)
  assert spec == P(None, None)


def test_parse_rules_rejects_bad_rules():
  assert sharding.parse_rules("") == []
  assert sharding.parse_rules("a=b=_,model") == [("a=b", (None, "model"))]
  for bad in ("fc1", "=model", "fc1=tensor", "fc1=model,model", "fc1(=model"):
    with pytest.raises(ValueError, match="sharding rule"):
      sharding.parse_rules(bad)


def test_constrain_batch_splits_rows_only_on_a_multi_device_mesh():
  x = np.ones((8, 4, 2), np.float32)
  assert activation_sharding.constrain_batch(x) is x  # no mesh set
  auto = (AxisType.Auto,) * len(sharding.MESH_AXES)
  for sizes, constrained in (((1, 1, 1), False), ((2, 4, 1), True)):
    with jax.sharding.use_abstract_mesh(AbstractMesh(sizes, sharding.MESH_AXES,
                                                     axis_types=auto)):
      eqns = jax.make_jaxpr(activation_sharding.constrain_batch)(x).eqns
    assert [e.primitive.name for e in eqns] == (["sharding_constraint"] if constrained else [])
    if constrained:
      assert eqns[0].params["sharding"].spec == P(activation_sharding.BATCH_AXES)


def _run_child(*args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def step_results():
  return _run_child("steps")


@pytest.mark.slow
@pytest.mark.parametrize("mesh, chunked, micro", STEPS)
def test_sharded_step_equals_one_device(step_results, mesh, chunked, micro):
  r = step_results[f"{mesh} chunked={chunked} micro={micro}"]
  np.testing.assert_allclose(r["losses"], step_results["one-device"]["losses"],
                             rtol=RTOL_LOSS)
  assert r["max_param_diff"] <= ATOL_PARAMS


def test_parameter_bytes_per_device_fall_as_one_over_fsdp():
  by_fsdp = _run_child("bytes")
  total, scalars = by_fsdp["total"], by_fsdp["unshardable"]
  for mesh in FSDP_MESHES:
    fsdp = sharding.parse_mesh(mesh)["fsdp"]
    measured = by_fsdp[mesh]
    assert measured["params"] == scalars + (total - scalars) // fsdp, mesh
    assert measured["params"] == measured["params_from_shapes"]
    assert measured["opt_state"] <= measured["opt_state_fsdp1"] // fsdp + 64, mesh


# The child process: 8 fake CPU devices, a tiny two-tower model, two train steps per mesh.

def _child_config():
  from navit_clip.config import default_config
  c = default_config()
  c.model.image.variant, c.model.text.variant = "mu/8", "mu"
  c.model.text.vocab_size, c.model.text.max_len = 64, 8
  c.data.batch_size, c.data.seq_len, c.data.max_images = 8, 32, 4
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1e-3, 0, "constant"
  c.optim.eps = 1e-6
  c.sharding.fsdp_min_size = 0
  return c


def _child_batch(config, step):
  """A random packed batch: rows of 1..M images with padding, some empty slots."""
  from navit_clip.data import pipeline
  spec = pipeline.batch_spec(config)
  rng = np.random.default_rng(step)
  batch = spec.zeros()
  b, l, m, t = spec.batch_size, spec.seq_len, spec.max_images, spec.text_len
  batch["patches"] = rng.integers(0, 256, batch["patches"].shape, dtype=np.uint8)
  for r in range(b):
    n_images = 1 + r % m
    cuts = np.sort(rng.choice(np.arange(1, l - 2), n_images, replace=False))
    start = 0
    for k, end in enumerate(cuts):
      n = end - start
      batch["segment_ids"][r, start:end] = k + 1
      batch["positions"][r, start:end] = np.stack([np.zeros(n), np.arange(n)], -1)
      batch["grid_hw"][r, start:end] = (1, n)
      batch["image_mask"][r, k] = True
      length = rng.integers(2, t)
      batch["text_tokens"][r, k, :length] = rng.integers(2, 64, length)
      batch["text_tokens"][r, k, length] = config.model.text.eos_id
      start = end
  return batch


def _device0_bytes(tree, device):
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def _child_init(config, mesh):
  """The train state created sharded on `mesh`, as the trainer does it."""
  import jax.numpy as jnp
  from flax import nnx
  from navit_clip.model import build_model
  from navit_clip.optim import make_optimizer

  model = build_model(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  tx = make_optimizer(config.optim, params, 10)

  def init_state(params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  shardings = sharding.state_shardings(jax.eval_shape(init_state, params), mesh,
                                       config.sharding)
  state = jax.jit(init_state, out_shardings=shardings)(params)
  return (graphdef, rest, tx), state, shardings


def _child_train(config, mesh, chunked, micro_batches=1):
  """Two train steps on `mesh`, the loss chunked or not, the towers in `micro_batches`:
  (losses, final state)."""
  from navit_clip.optim import frozen_mask, make_schedule
  from navit_clip.train import make_train_step

  config.loss.chunked = chunked
  (graphdef, rest, tx), state, shardings = _child_init(config, mesh)
  step = jax.jit(make_train_step(graphdef, rest, tx, make_schedule(config.optim, 10), 1,
                                 frozen_mask(config.optim, state["params"]),
                                 micro_batches=micro_batches),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  with jax.set_mesh(mesh):
    compiled = step.lower(state, _child_batch(config, 0)).compile()
  losses = []
  for i in range(2):
    batch = sharding.global_batch(_child_batch(config, i), mesh, config.data.batch_size)
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state, shardings


def _child_steps(config, devices):
  """Losses and largest parameter difference from one device, per (mesh, chunked) of STEPS."""
  losses, state, _ = _child_train(config, sharding.make_mesh("data:1", devices[:1]), False)
  out = {"one-device": {"losses": losses}}
  reference = jax.device_get(state["params"])
  for spec, chunked, micro in STEPS:
    losses, state, _ = _child_train(config, sharding.make_mesh(spec), chunked, micro)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                         jax.device_get(state["params"]), reference)
    out[f"{spec} chunked={chunked} micro={micro}"] = {
        "losses": losses, "max_param_diff": max(jax.tree.leaves(diffs))}
  return out


def _bench_bytes_per_device():
  """bench/sharding_memory.py's count of one device's bytes from the shard shapes."""
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "sharding_memory.py"
  spec = importlib.util.spec_from_file_location("sharding_memory", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.bytes_per_device


def _child_bytes(config, devices):
  """Bytes of parameters and optimizer state on device 0, per mesh of FSDP_MESHES."""
  bytes_per_device = _bench_bytes_per_device()
  sizes = {}
  for spec in FSDP_MESHES:
    _, state, shardings = _child_init(config, sharding.make_mesh(spec))
    sizes[spec] = {
        "params": _device0_bytes(state["params"], devices[0]),
        "params_from_shapes": bytes_per_device(state["params"], shardings["params"]),
        "opt_state": _device0_bytes(state["opt_state"], devices[0]),
    }
    params = state["params"]
  for spec in FSDP_MESHES:
    sizes[spec]["opt_state_fsdp1"] = sizes["data:8"]["opt_state"]
  leaves = jax.tree.leaves(params)
  sizes["total"] = sum(x.nbytes for x in leaves)
  sizes["unshardable"] = sum(x.nbytes for x in leaves if x.ndim == 0)
  return sizes


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 8)
  assert len(jax.devices()) == 8, jax.devices()
  run = {"steps": _child_steps, "bytes": _child_bytes}[sys.argv[1]]
  print(json.dumps(run(_child_config(), jax.devices())))
