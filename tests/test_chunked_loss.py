"""Chunked contrastive losses equal the dense ones in value and gradient, on 8 devices.

The 8-device checks run this file as a script in a subprocess with 8 fake CPU devices
(the pytest process has already started JAX with one).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from navit_clip import losses, sharding

MESHES = ("data:8", "fsdp:8", "data:2,fsdp:4", "data:2,fsdp:2,model:2")
# (loss, bias): the sigmoid loss with and without its bias, the softmax loss.
CASES = (("sigmoid", -10.0), ("sigmoid", None), ("softmax", None))
RTOL = 1e-5  # relative to the largest magnitude of the compared value or gradient
B, M, D = 16, 3, 8


def test_chunked_loss_needs_a_mesh():
  x = jnp.zeros((2, 1, 4))
  with pytest.raises(ValueError, match="jax.set_mesh"):
    losses.contrastive_loss_fn("sigmoid", chunked=True)(x, x, jnp.ones((2, 1), bool), 0.0)


def test_chunked_loss_on_one_device_equals_dense():
  rng = np.random.default_rng(0)
  img, txt, valid = _inputs(rng)
  mesh = sharding.make_mesh("data:1", jax.devices()[:1])
  for name, bias in CASES:
    dense = _value_and_grads(name, False, img, txt, valid, bias)
    with jax.set_mesh(mesh):
      chunked = _value_and_grads(name, True, img, txt, valid, bias)
    for d, c in zip(dense, chunked):
      np.testing.assert_allclose(c, d, rtol=RTOL, atol=RTOL * np.abs(d).max())


def test_only_contrastive_losses_chunk():
  for name in ("sigmoid_xent", "siglip"):
    with pytest.raises(ValueError, match=f"unknown contrastive loss '{name}'"):
      losses.contrastive_loss_fn(name, chunked=True)


def _inputs(rng, all_empty=False):
  """Unit embeddings [B, M, D] with NaN in empty slots, and the slot mask."""
  img = rng.standard_normal((B, M, D)).astype(np.float32)
  txt = rng.standard_normal((B, M, D)).astype(np.float32)
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  valid = np.zeros((B, M), bool) if all_empty else rng.random((B, M)) < 0.6
  img[~valid] = np.nan
  txt[~valid] = np.inf
  return img, txt, valid


def _value_and_grads(name, chunked, img, txt, valid, bias):
  """(loss, n_valid, d/dimg, d/dtxt, d/dt', d/db) as NumPy arrays."""
  loss_fn = losses.contrastive_loss_fn(name, chunked=chunked)

  def loss(img, txt, scale, b):
    value, metrics = loss_fn(img, txt, jnp.asarray(valid), scale, None if bias is None else b)
    return value, metrics["n_valid"]

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  (value, n), grads = grad_fn(img, txt, jnp.float32(np.log(10.0)),
                              jnp.float32(0.0 if bias is None else bias))
  return [np.asarray(a) for a in (value, n, *grads)]


@pytest.fixture(scope="module")
def child_results():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name, bias", CASES)
def test_chunked_equals_dense_in_value_and_gradient(child_results, mesh, name, bias):
  r = child_results[f"{mesh} {name} {bias}"]
  assert r["n_valid"] == r["dense_n_valid"] > 0
  assert r["max_rel_diff"] <= RTOL, r
  assert r["finite"]


@pytest.mark.parametrize("name, bias", CASES)
def test_all_empty_batch_gives_zero_loss_and_gradients(child_results, name, bias):
  r = child_results[f"empty {name} {bias}"]
  assert r["loss"] == 0.0 and r["max_abs_grad"] == 0.0


def _child_main():
  assert len(jax.devices()) == 8, jax.devices()
  rng = np.random.default_rng(0)
  img, txt, valid = _inputs(rng)
  rows = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
  out = {}
  for name, bias in CASES:
    dense = _value_and_grads(name, False, img, txt, valid, bias)
    for spec in MESHES:
      mesh = sharding.make_mesh(spec)
      placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, rows)) for a in (img, txt)]
      with jax.set_mesh(mesh):
        chunked = _value_and_grads(name, True, *placed, valid, bias)
      rel = [float(np.max(np.abs(c - d)) / max(np.max(np.abs(d)), 1e-30))
             for c, d in zip(chunked, dense)]
      out[f"{spec} {name} {bias}"] = {
          "max_rel_diff": max(rel), "n_valid": float(chunked[1]),
          "dense_n_valid": float(dense[1]),
          "finite": bool(all(np.isfinite(a).all() for a in chunked))}
    empty_img, empty_txt, empty = _inputs(rng, all_empty=True)
    with jax.set_mesh(sharding.make_mesh("data:2,fsdp:4")):
      res = _value_and_grads(name, True, empty_img, empty_txt, empty, bias)
    out[f"empty {name} {bias}"] = {"loss": float(res[0]),
                                   "max_abs_grad": float(max(np.abs(g).max() for g in res[2:]))}
  print(json.dumps(out))


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 8)
  _child_main()
