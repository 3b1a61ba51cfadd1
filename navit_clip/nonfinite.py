"""NaN or Inf in the loss or the gradients: never applied, then skipped or stopped on.

Inside the jitted step (`keep_if_finite`): a step whose loss or gradient norm is not
finite, or whose update would leave a parameter or optimizer-state value non-finite (an
overflowing update), returns the parameters and optimizer state it was given, unchanged (a
select that fuses into the update; no host sync), advances the step counter (the batch is
consumed), and reports `nonfinite` = 1.0 in its metrics. So no state, and no checkpoint,
ever holds a non-finite parameter.

On the host (`NonfiniteMonitor`): the per-step loss and `nonfinite` flag stay on the device
until a step where the host syncs anyway (a log step, and before every checkpoint save).
There, config.train.nonfinite decides:
  "stop": raise TrainingDiverged naming the bad steps and the last checkpoint. Since
          the check runs before every save, no checkpoint ever holds a state from after a
          non-finite step, so the latest checkpoint is the last good one;
  "skip": log a warning and go on; the bad steps' updates were never applied, and the
          count of skipped steps is logged as `nonfinite_steps`. A run that only skips is
          not training: `max_consecutive` skipped steps in a row stop it as "stop" does.
The counts travel with the checkpoints (`counts()`, restored through `counts=`), so
`nonfinite_steps` and the run of consecutive skips carry on across a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from navit_clip.choices import check_choice
from navit_clip.errors import UserError

log = logging.getLogger(__name__)

MODES = ("stop", "skip")  # the choices of config.train.nonfinite


class TrainingDiverged(UserError, FloatingPointError):
  """The run stopped on non-finite losses or gradients (config.train.nonfinite).

  An outcome of the run's settings or data, not a defect: the command line prints it as
  one line (what happened, the last good checkpoint, what to change) and exits 2.
  """


def all_finite(tree) -> jax.Array:
  """bool []: whether every floating-point value of `tree` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def keep_if_finite(loss: jax.Array, grad_norm: jax.Array, new, old):
  """(`new` if loss, grad_norm and every value of `new` are finite else `old`, nonfinite
  flag float32 []).

  Args:
    loss: float32 [], the step's loss.
    grad_norm: float32 [], the global norm of the step's gradients (NaN or Inf if any
      gradient is).
    new: the updated pytree (parameters, optimizer state).
    old: the pytree before the update, with `new`'s structure.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new)
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept, jnp.where(ok, 0.0, 1.0).astype(jnp.float32)


class NonfiniteMonitor:
  """Collects each step's loss and non-finite flag; acts on them at host sync points.

  Attributes:
    losses: the host loss of every checked step, in order (NaN / Inf for skipped steps).
    skipped: how many steps were non-finite so far in the run (resumes included).
    consecutive: how many of the latest checked steps in a row were non-finite.
  """

  def __init__(self, mode: str, checkpoints, max_consecutive: int = 10,
               counts: Mapping[str, int] | None = None):
    """`checkpoints` (a navit_clip.checkpoint.Checkpointer) names the last good one in
    errors; `counts` are those a checkpoint was saved with (`counts()`), {} for a new run."""
    check_choice("config.train.nonfinite", mode, MODES)
    self.mode = mode
    self.max_consecutive = max_consecutive
    self.losses: list[float] = []
    counts = counts or {}
    self.skipped = int(counts.get("nonfinite_steps", 0))
    self.consecutive = int(counts.get("consecutive_nonfinite", 0))
    self._checkpoints = checkpoints
    self._pending: list[tuple[int, jax.Array, jax.Array]] = []

  def counts(self) -> dict[str, int]:
    """The counts to save with a checkpoint (as of the last `check`)."""
    return {"nonfinite_steps": self.skipped, "consecutive_nonfinite": self.consecutive}

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
    for f in flags:
      self.consecutive = self.consecutive + 1 if f > 0 else 0
    if not bad:
      return
    self.skipped += len(bad)
    where = f"step {bad[0]}" if len(bad) == 1 else f"{len(bad)} steps in {bad[0]}..{bad[-1]}"
    if self.mode == "stop":
      raise TrainingDiverged(
          f"non-finite loss or gradients at {where} (loss {float(loss[steps.index(bad[0])])});"
          f" those updates were not applied. Last good checkpoint: {self._last_good()}. Set "
          f"config.train.nonfinite = 'skip' to skip such steps instead.")
    if self.consecutive >= self.max_consecutive:
      raise TrainingDiverged(
          f"{self.consecutive} non-finite steps in a row, up to step {steps[-1]} "
          f"(config.train.max_consecutive_nonfinite = {self.max_consecutive}): the run is "
          f"not training; none of those updates was applied. Last good checkpoint: "
          f"{self._last_good()}. Lower the learning rate or look for bad data.")
    log.warning("non-finite loss or gradients at %s; skipped those updates (%d skipped so "
                "far)", where, self.skipped)

  def _last_good(self) -> str:
    last = self._checkpoints.latest_step()
    return (f"step {last} in {self._checkpoints.directory}" if last is not None
            else "none (no checkpoint saved yet)")
