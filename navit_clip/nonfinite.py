"""NaN or Inf in the loss or the gradients: never applied, then skipped or stopped on.

Inside the jitted step (`keep_if_finite`): a step whose loss or gradient norm is not
finite returns the parameters and optimizer state it was given, unchanged (a select that
fuses into the update; no host sync), advances the step counter (the batch is consumed), and
reports `nonfinite` = 1.0 in its metrics.

On the host (`NonfiniteMonitor`): the per-step loss and `nonfinite` flag stay on the device
until a step where the host syncs anyway (a log step, and before every checkpoint save).
There, config.train.nonfinite decides:
  "stop": raise FloatingPointError naming the bad steps and the last checkpoint. Since
          the check runs before every save, no checkpoint ever holds a state from after a
          non-finite step, so the latest checkpoint is the last good one;
  "skip": log a warning and go on; the bad steps' updates were never applied, and the
          count of skipped steps is logged as `nonfinite_steps`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from navit_clip.choices import check_choice

log = logging.getLogger(__name__)

MODES = ("stop", "skip")  # the choices of config.train.nonfinite


def keep_if_finite(loss: jax.Array, grad_norm: jax.Array, new, old):
  """(`new` if loss and grad_norm are finite else `old`, nonfinite flag float32 []).

  Args:
    loss: float32 [], the step's loss.
    grad_norm: float32 [], the global norm of the step's gradients (NaN or Inf if any
      gradient is).
    new: the updated pytree (parameters, optimizer state).
    old: the pytree before the update, with `new`'s structure.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept, jnp.where(ok, 0.0, 1.0).astype(jnp.float32)


class NonfiniteMonitor:
  """Collects each step's loss and non-finite flag; acts on them at host sync points.

  Attributes:
    losses: the host loss of every checked step, in order (NaN / Inf for skipped steps).
    skipped: how many steps were non-finite so far in this process's run.
  """

  def __init__(self, mode: str, checkpoints):
    check_choice("config.train.nonfinite", mode, MODES)
    self.mode = mode
    self.losses: list[float] = []
    self.skipped = 0
    self._checkpoints = checkpoints
    self._pending: list[tuple[int, jax.Array, jax.Array]] = []

  def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Keeps step `step`'s device scalars `loss` and `nonfinite` without syncing."""
    self._pending.append((step, metrics["loss"], metrics["nonfinite"]))

  def check(self) -> None:
    """Fetches the recorded steps; raises in "stop" mode if any was non-finite."""
    if not self._pending:
      return
    steps = [s for s, _, _ in self._pending]
    loss, flags = jax.device_get(([l for _, l, _ in self._pending],
                                  [f for _, _, f in self._pending]))
    self._pending.clear()
    self.losses.extend(float(x) for x in loss)
    bad = [s for s, f in zip(steps, flags) if f > 0]
    if not bad:
      return
    self.skipped += len(bad)
    where = f"step {bad[0]}" if len(bad) == 1 else f"{len(bad)} steps in {bad[0]}..{bad[-1]}"
    if self.mode == "stop":
      last = self._checkpoints.latest_step()
      good = (f"step {last} in {self._checkpoints.directory}" if last is not None
              else "none (no checkpoint saved yet)")
      raise FloatingPointError(
          f"non-finite loss or gradients at {where} (loss {float(loss[steps.index(bad[0])])});"
          f" those updates were not applied. Last good checkpoint: {good}. Set "
          f"config.train.nonfinite = 'skip' to skip such steps instead.")
    log.warning("non-finite loss or gradients at %s; skipped those updates (%d skipped so "
                "far)", where, self.skipped)
