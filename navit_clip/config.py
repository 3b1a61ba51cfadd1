"""Configuration: the typed defaults, and `validate`, which checks what types cannot.

`default_config()` (navit_clip.config_defaults) holds every key with its default and so its
type; recipes in configs/ start from it and override what they change, and the command
line overrides any field (`--config.model.image.variant=B/16`). `eval_config()`
(navit_clip.evaluate.evaluators) adds an evaluator to `config.evals`.

`validate()` checks the values and combinations that types cannot. Each section is checked
by the module that reads it (its `check_config`, beside its choice lists), and every error
names the full key: "config.model.image.posemb = 'x'; expected one of [...]". This module
sits on top of all of them, the trainer included; no module below imports it.
"""

from __future__ import annotations

import ml_collections

from navit_clip import distributed, image_tower, init_from, losses, model, optim, sharding, train
from navit_clip.config_defaults import default_config
from navit_clip.data import pipeline
from navit_clip.evaluate import evaluators, inference_resolution
from navit_clip.evaluate.evaluators import eval_config
from navit_clip.text import tower as text_tower

__all__ = ["default_config", "eval_config", "validate"]


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key for values and combinations that types cannot catch.

  The sections in the order a run reads them: model (towers, task), data, loss, optimizer,
  devices, processes, trainer, initial parameters, evaluators, inference resolution.
  """
  image_tower.check_config(c.model.image)
  text_tower.check_config(c.model.text)
  model.check_config(c)
  pipeline.check_config(c.data)
  losses.check_config(c.loss)
  optim.check_config(c.optim)
  sharding.check_config(c)
  distributed.check_config(c.distributed)
  train.check_config(c.train)
  init_from.check_config(c.init)
  evaluators.check_config(c.evals)
  inference_resolution.check_config(c.inference_resolution)
