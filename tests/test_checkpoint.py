"""Checkpoints: retention, atomicity, and restoring onto another mesh.

The mesh checks run this file as a script in a subprocess with 8 fake CPU devices (the
pytest process has already started JAX with one): a run trained on "data:8" resumes on
"data:2,fsdp:4" there, and on one device here.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from navit_clip.checkpoint import (CheckpointMismatchError, Checkpointer, restore_params,
                                   state_checksums)
from navit_clip.param_rules import flatten_names
from navit_clip.train import train

STEPS, RESUME_AT = 6, 4
RTOL_LOSS = 1e-5  # another mesh sums across devices in another order
ATOL_PARAMS = 1e-5


def _flat(params) -> dict[str, np.ndarray]:
  """{"/"-joined name: value}: int and str keys of one list name the same parameter."""
  return dict(zip(jax.tree.leaves(flatten_names(params)), map(np.asarray,
                                                               jax.tree.leaves(params))))


def _params(result) -> dict[str, np.ndarray]:
  return _flat(nnx.to_pure_dict(nnx.state(result.model, nnx.Param)))


def _saved_params(workdir, step: int) -> dict[str, np.ndarray]:
  """The parameters saved at `step`, read on their own (one device)."""
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree["params"]
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  return _flat(restore_params(state_dir, abstract))


def _copy_until(src, dst, step: int) -> str:
  """A copy of workdir `src` with its checkpoints after `step` removed."""
  shutil.copytree(src, dst)
  for name in os.listdir(os.path.join(dst, "checkpoints")):
    if int(name) > step:
      shutil.rmtree(os.path.join(dst, "checkpoints", name))
  return str(dst)


def _mesh_config(tokenizer, mesh: str):
  from conftest import tiny_demo_config
  config = tiny_demo_config(tokenizer, steps=STEPS)
  config.data.batch_size = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 10
  config.mesh = mesh
  config.sharding.fsdp_min_size = 0
  return config


def test_keep_the_last_k_and_every_period_th_forever(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2, keep_period=4)
  state = {"params": {"w": jnp.ones((3, 4))}, "step": jnp.int32(0)}
  for step in range(1, 11):
    ckpt.save(step, state)
  ckpt.close()
  assert sorted(Checkpointer(str(tmp_path)).all_steps()) == [4, 8, 9, 10]


def test_checksums_see_every_changed_bit_and_moved_value_of_any_dtype():
  arrays = {"f32": jnp.linspace(-1, 1, 12).reshape(3, 4), "i8": jnp.arange(7, dtype=jnp.int8),
            "bf16": jnp.linspace(0, 1, 5, dtype=jnp.bfloat16), "mask": jnp.array([True, False]),
            "step": jnp.int32(5)}
  sums = {k: v["sum"] for k, v in state_checksums(arrays).items()}
  assert len(set(sums.values())) == len(sums)
  flipped = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(arrays["f32"], jnp.uint32).at[1, 2].add(1), jnp.float32)
  changed = {**arrays, "f32": flipped, "i8": arrays["i8"][::-1],
             "bf16": arrays["bf16"].at[0].set(1e-8), "mask": ~arrays["mask"]}
  again = state_checksums(changed)
  assert all(again[k]["sum"] != sums[k] for k in ("f32", "i8", "bf16", "mask"))
  assert again["step"]["sum"] == sums["step"]
  assert again["f32"] == {"shape": [3, 4], "dtype": "float32", "sum": again["f32"]["sum"]}


def test_a_checkpoint_of_another_state_is_a_mismatch_not_damage(tmp_path):
  ckpt = Checkpointer(str(tmp_path), writer=True)
  ckpt.save_and_wait(1, {"w": jnp.ones((3, 4)), "step": jnp.int32(1)})
  with pytest.raises(CheckpointMismatchError, match=r"unexpected: step \(1\); another "
                     r"shape or dtype: w \(1\)"):
    ckpt.restore(None, {"w": jnp.zeros((4, 4))})
  restored = ckpt.restore(None, {"w": jnp.zeros((3, 4)), "step": jnp.int32(0)})
  assert restored.step == 1 and float(restored.state["w"].sum()) == 12.0
  ckpt.close()
  assert os.listdir(tmp_path) == ["1"]  # nothing set aside


def test_an_interrupted_save_is_ignored_and_cleaned_on_resume(tiny_config, tmp_path):
  config = tiny_config(steps=STEPS)
  config.train.checkpoint_every = 2
  unbroken = train(config, str(tmp_path / "unbroken"))
  workdir = _copy_until(tmp_path / "unbroken", tmp_path / "broken", RESUME_AT)
  # A save of step 6 cut off half-way: Orbax's temporary directory, files half written.
  partial = os.path.join(workdir, "checkpoints", f"{STEPS}.orbax-checkpoint-tmp-1700000000")
  shutil.copytree(os.path.join(workdir, "checkpoints", str(RESUME_AT)), partial)
  for root, _, files in os.walk(partial):
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)
  os.remove(os.path.join(partial, "commit_success.txt"))
  resumed = train(config, workdir)
  assert resumed.losses == unbroken.losses[RESUME_AT:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]


@pytest.mark.slow
def test_restore_onto_other_meshes(demo_tokenizer_path, tmp_path):
  out = tmp_path / "child.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, demo_tokenizer_path, str(tmp_path),
                         str(out)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  child = json.loads(out.read_text())
  assert child["restored_equal_saved"] and child["fsdp_sharded"]
  np.testing.assert_allclose(child["resumed_losses"], child["unbroken_losses"][RESUME_AT:],
                             rtol=RTOL_LOSS)
  assert child["final_params_max_diff"] < ATOL_PARAMS
  # The same checkpoint of the 8-device run, on this process's single device.
  assert jax.device_count() == 1
  unbroken = str(tmp_path / "data8")
  workdir = _copy_until(unbroken, tmp_path / "one_device", RESUME_AT)
  config = _mesh_config(demo_tokenizer_path, "data:1")
  config.train.total_steps = RESUME_AT  # restore only
  restored = _params(train(config, workdir))
  saved = _saved_params(unbroken, RESUME_AT)
  assert restored.keys() == saved.keys()
  for name in saved:
    np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)
  config.train.total_steps = STEPS
  resumed = train(config, workdir)
  np.testing.assert_allclose(resumed.losses, child["unbroken_losses"][RESUME_AT:],
                             rtol=RTOL_LOSS)
  final, expected = _params(resumed), _saved_params(unbroken, STEPS)
  for name in expected:
    np.testing.assert_allclose(final[name], expected[name], atol=ATOL_PARAMS, err_msg=name)


def _child_main(tokenizer, root, out):
  """Trains on data:8, then restores and resumes on data:2,fsdp:4; writes the results."""
  jax.config.update("jax_num_cpu_devices", 8)
  unbroken_dir = os.path.join(root, "data8")
  unbroken = train(_mesh_config(tokenizer, "data:8"), unbroken_dir)
  workdir = _copy_until(unbroken_dir, os.path.join(root, "data2_fsdp4"), RESUME_AT)
  config = _mesh_config(tokenizer, "data:2,fsdp:4")
  config.train.total_steps = RESUME_AT  # restore only
  restored = train(config, workdir)
  restored_params, saved = _params(restored), _saved_params(unbroken_dir, RESUME_AT)
  kernel = restored.model.text.proj.kernel[...]
  config.train.total_steps = STEPS
  resumed = train(config, workdir)
  final, expected = _params(resumed), _params(unbroken)
  with open(out, "w", encoding="utf-8") as f:
    json.dump({
        "unbroken_losses": unbroken.losses,
        "resumed_losses": resumed.losses,
        "restored_equal_saved": restored_params.keys() == saved.keys() and all(
            np.array_equal(restored_params[n], saved[n]) for n in saved),
        "fsdp_sharded": "fsdp" in str(kernel.sharding.spec),
        "final_params_max_diff": max(float(np.max(np.abs(final[n] - expected[n])))
                                     for n in expected),
    }, f)


if __name__ == "__main__":
  _child_main(*sys.argv[1:])
