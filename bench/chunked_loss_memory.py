"""Compiled per-device memory of the contrastive losses: dense against chunked.

  .venv/bin/python bench/chunked_loss_memory.py                    # N = 4096 and 32768
  .venv/bin/python bench/chunked_loss_memory.py --slots 4096 --dim 1152

Loss and gradients w.r.t. the embeddings [N / M, M, D] (M = 8 slots a row), compiled (not
run) for 8 fake CPU devices with the rows split over ("data", "fsdp"); the figure is XLA's
memory_analysis() of the compiled program, per device: temporaries + arguments + outputs.
  dense, 1 device    the global [N, N] logits on one device (the reference)
  dense, 8 devices   the same program, partitioned by the compiler (GSPMD)
  chunked            navit_clip.chunked_loss: embeddings passed round the ring of devices,
                     [n, n] blocks of logits, n = N / 8
"""

from __future__ import annotations

import argparse

import jax

DEVICES = 8
SLOTS_PER_ROW = 8


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--slots", type=int, nargs="+", default=[4096, 32768],
                      help="global number of image-text slots N")
  parser.add_argument("--dim", type=int, default=768, help="embedding dimension D")
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", DEVICES)

  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from navit_clip import losses, sharding

  def peak_bytes(name: str, chunked: bool, n: int, mesh) -> int:
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    emb = jax.ShapeDtypeStruct((n // SLOTS_PER_ROW, SLOTS_PER_ROW, args.dim), jnp.float32,
                               sharding=rows)
    valid = jax.ShapeDtypeStruct(emb.shape[:2], jnp.bool_, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))

    loss_fn = losses.contrastive_loss_fn(name, chunked=chunked)

    def loss(img, txt, valid, scale, bias):
      return loss_fn(img, txt, valid, scale, bias)[0]

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4)))
    with jax.set_mesh(mesh):
      m = fn.lower(emb, emb, valid, scalar, scalar).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

  one = sharding.make_mesh("data:1", jax.devices()[:1])
  eight = sharding.make_mesh(f"data:{DEVICES}")
  print(f"per-device memory of loss + gradients, D = {args.dim}, {DEVICES} fake CPU devices")
  print(f"{'loss':>8} {'N':>6} {'dense 1 dev MiB':>16} {'dense 8 dev MiB':>16} "
        f"{'chunked MiB':>12} {'chunked/dense-8':>16}")
  for base in losses.CONTRASTIVE_LOSSES:
    for n in args.slots:
      dense1 = peak_bytes(base, False, n, one)
      dense8 = peak_bytes(base, False, n, eight)
      chunked = peak_bytes(base, True, n, eight)
      print(f"{base:>8} {n:>6} {dense1 / 2**20:>16.1f} {dense8 / 2**20:>16.1f} "
            f"{chunked / 2**20:>12.1f} {chunked / dense8:>16.3f}")


if __name__ == "__main__":
  main()
