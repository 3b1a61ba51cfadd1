"""Per-device parameter and optimizer-state memory of a B/16 SigLIP against the mesh.

  .venv/bin/python bench/sharding_memory.py                       # configs/siglip_navit_b16
  .venv/bin/python bench/sharding_memory.py --config siglip_navit_so400m14

No memory is spent: the train state is traced with jax.eval_shape, each leaf is given its
sharding by the rules of config.sharding (navit_clip.sharding) on meshes of 1, 2, 4 and 8
fake CPU devices, and the bytes that one device holds are summed from the shard shapes.
Ratios are against one device; the ideal is 1 / (fsdp * model), plus what stays replicated
(leaves below config.sharding.fsdp_min_size elements, and dimensions that nothing divides).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import jax
import numpy as np

MESHES = ("fsdp:1", "fsdp:2", "fsdp:4", "fsdp:8", "data:2,fsdp:4", "fsdp:4,model:2")


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes that one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings`.

  Every sharding of navit_clip.sharding splits dimensions evenly, so all devices hold the
  same amount.
  """
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="siglip_navit_b16")
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", 8)

  import jax.numpy as jnp
  from flax import nnx

  from navit_clip import sharding
  from navit_clip.config_loading import load_config
  from navit_clip.model import build_model
  from navit_clip.optim import frozen_mask, make_optimizer, split_frozen

  config = load_config(args.config)
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
  tx = make_optimizer(config.optim, params, config.train.total_steps)
  trainable = split_frozen(params, frozen_mask(config.optim, params))[0]  # as the trainer does
  state = jax.eval_shape(lambda p, t: {"params": p, "opt_state": tx.init(t),
                                       "step": jnp.zeros((), jnp.int32)}, params, trainable)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"{args.config}: {n_params / 1e6:.1f}M parameters, optimizer {config.optim.name}, "
        f"fsdp_min_size {config.sharding.fsdp_min_size}")
  print(f"{'mesh':>16} {'devices':>7} {'params MiB':>11} {'ratio':>6} {'opt MiB':>9} "
        f"{'ratio':>6} {'ideal':>7}")
  base = None
  for spec in MESHES:
    sizes = sharding.parse_mesh(spec)
    devices = sizes["data"] * sizes["fsdp"] * sizes["model"]
    mesh = sharding.make_mesh(spec, jax.devices()[:devices])
    shardings = sharding.state_shardings(state, mesh, config.sharding)
    p = bytes_per_device(state["params"], shardings["params"])
    o = bytes_per_device(state["opt_state"], shardings["opt_state"])
    base = base or (p, o)
    ideal = 1 / (sizes["fsdp"] * sizes["model"])
    print(f"{spec:>16} {devices:>7} {p / 2**20:>11.1f} {p / base[0]:>6.3f} "
          f"{o / 2**20:>9.1f} {o / base[1]:>6.3f} {ideal:>7.3f}")


if __name__ == "__main__":
  main()
