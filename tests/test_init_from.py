"""Starting from another run: a classification run's image tower under a contrastive run."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import tiny_demo_config
from navit_clip import init_from
from navit_clip.checkpoint import restore_params
from navit_clip.model import build_model
from navit_clip.param_rules import flatten_names
from navit_clip.train import train

SOURCE_STEPS = 3


@pytest.fixture(scope="module")
def classification_workdir(demo_tokenizer_path, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("classification"))
  train(tiny_demo_config(demo_tokenizer_path, "demo_classification", SOURCE_STEPS), workdir)
  return workdir


def _named(params) -> dict[str, np.ndarray]:
  return dict(zip(jax.tree.leaves(flatten_names(params)), map(np.asarray,
                                                              jax.tree.leaves(params))))


def _source_image(workdir) -> dict[str, np.ndarray]:
  """The source run's image tower, read with this model's layout."""
  config = tiny_demo_config("", "demo_classification")
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state_dir = os.path.join(workdir, "checkpoints", str(SOURCE_STEPS), "state")
  return _named({"image": restore_params(state_dir, {"image": params["image"]})["image"]})


def _model_params(config, model=None):
  model = model or build_model(config, rngs=nnx.Rngs(config.seed))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _on_device(params):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, params)


def _contrastive(tokenizer, workdir: str, params: str = "image"):
  config = tiny_demo_config(tokenizer, steps=4)
  config.init.checkpoint = workdir
  config.init.params = params
  return config


def test_load_params_copies_the_image_tower_and_nothing_else(demo_tokenizer_path,
                                                             classification_workdir):
  config = _contrastive(demo_tokenizer_path, classification_workdir)
  fresh = _model_params(config)
  loaded = _named(init_from.load_params(config.init, fresh, _on_device(fresh)))
  source, fresh = _source_image(classification_workdir), _named(fresh)
  assert source and all(np.array_equal(loaded[n], source[n]) for n in source)
  assert not any(np.array_equal(fresh[n], source[n]) for n in source if "kernel" in n)
  for name in fresh.keys() - source.keys():
    np.testing.assert_array_equal(loaded[name], fresh[name], err_msg=name)


def test_lit_keeps_the_copied_tower_frozen_while_text_learns(demo_tokenizer_path,
                                                             classification_workdir, tmp_path):
  config = _contrastive(demo_tokenizer_path, classification_workdir)
  config.optim.lr_mults = "image/.*=0"
  result = train(config, str(tmp_path))
  trained, fresh = _named(_model_params(config, result.model)), _named(_model_params(config))
  source = _source_image(classification_workdir)
  for name in source:
    np.testing.assert_array_equal(trained[name], source[name], err_msg=name)
  assert not np.array_equal(trained["text/proj/kernel"], fresh["text/proj/kernel"])
  saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "4" / "state")
  opt_names = jax.tree.leaves(flatten_names(saved["opt_state"]))
  assert any("/text/" in n for n in opt_names)  # the optimizer holds the text side only
  assert not any("/image/" in n for n in opt_names)


def test_a_step_directory_and_a_prefix_mapping_are_accepted(demo_tokenizer_path,
                                                            classification_workdir):
  step_dir = os.path.join(classification_workdir, "checkpoints", str(SOURCE_STEPS))
  config = _contrastive(demo_tokenizer_path, step_dir, "image/encoder->image/encoder")
  assert init_from.resolve_state_dir(step_dir, -1) == (os.path.join(step_dir, "state"),
                                                       SOURCE_STEPS)
  params = _model_params(config)
  loaded = _named(init_from.load_params(config.init, params, _on_device(params)))
  source = _source_image(classification_workdir)
  encoder = [n for n in source if n.startswith("image/encoder/")]
  assert encoder and all(np.array_equal(loaded[n], source[n]) for n in encoder)


@pytest.mark.parametrize("change, params, message", [
    (lambda c: setattr(c.model.image, "posemb_resolution", 8), "image",
     r"'image/posemb/table_x' is \[16, 32\] in checkpoint .* but this model's "
     r"'image/posemb/table_x' is \[8, 32\]"),
    (lambda c: None, "text", r"has no parameter 'text/.*' for this model's 'text/"),
    (lambda c: None, "image->vision", r"no parameter of this model is under 'vision'"),
    (lambda c: None, "head->image", r"has no parameter 'head/"),
])
def test_mismatches_name_the_parameter(demo_tokenizer_path, classification_workdir, change,
                                       params, message):
  config = _contrastive(demo_tokenizer_path, classification_workdir, params)
  change(config)
  abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  with pytest.raises(ValueError, match=message):
    init_from.load_params(config.init, params, _on_device(params))


def test_a_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.init.checkpoint"):
    init_from.resolve_state_dir(str(tmp_path / "nope"), -1)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    init_from.resolve_state_dir(str(tmp_path), -1)
