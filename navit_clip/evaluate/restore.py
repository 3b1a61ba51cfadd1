"""Loading a trained model from a workdir: config.json + a checkpoint's parameters.

The trainer writes `workdir/config.json` and Orbax checkpoints under `workdir/checkpoints`
(see navit_clip.train and navit_clip.checkpoint). Inference needs only the "params" of the
saved train state: they are restored on their own (a partial restore), so the optimizer
state is never read or built.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
from flax import nnx

from navit_clip import storage
from navit_clip.checkpoint import committed_steps, restore_params, step_dir
from navit_clip.config_defaults import default_config
from navit_clip.errors import MissingInputError, UserError, as_user_errors
from navit_clip.model import build_model
from navit_clip.workdir import saved_tokenizer_path


@dataclasses.dataclass
class Restored:
  """A model restored from `workdir` at `step`, with the config it was trained with."""

  model: nnx.Module
  config: ml_collections.ConfigDict
  step: int
  workdir: str


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict the run in `workdir` was trained with: its config.json over the defaults.

  Keys that config.json lacks (added to the framework after the run) keep their defaults.
  A relative tokenizer path (the trainer's copy, tokenizer.model) is taken from `workdir`.
  """
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    raise MissingInputError(f"{path!r} does not exist; is {workdir!r} a training workdir?")
  config = default_config()
  with storage.open(path, "r") as f, as_user_errors(path, (ValueError, TypeError)):
    config.update(json.load(f))
  config.data.tokenizer.path = saved_tokenizer_path(workdir, config.data.tokenizer.path)
  return config


def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoint steps in `workdir/checkpoints` (local or a URL), ascending."""
  return committed_steps(storage.join(storage.absolute(workdir), "checkpoints"))


def restore_model(workdir: str, step: int | None = None) -> Restored:
  """The model trained in `workdir` (local or a URL) at checkpoint `step` (the latest if
  None).

  `workdir` may be relative (Orbax needs absolute paths; it is made absolute here). On an
  object store Orbax cannot read (not gs://), only that step is downloaded.
  """
  workdir = storage.absolute(workdir)
  config = load_config(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise MissingInputError(f"no complete checkpoint in {storage.join(workdir, 'checkpoints')}")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise UserError(f"no checkpoint at step {step} in {workdir!r}; steps: {steps}")
  abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(config.seed)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):  # non-parameter state (e.g. RNG keys) is built, not restored
    _, _, rest = nnx.split(build_model(config, rngs=nnx.Rngs(config.seed)), nnx.Param, ...)
  state_dir = storage.join(step_dir(storage.join(workdir, "checkpoints"), step), "state")
  params = restore_params(state_dir, nnx.to_pure_dict(params))
  model = nnx.merge(graphdef, params, rest)
  return Restored(model=model, config=config, step=step, workdir=workdir)
