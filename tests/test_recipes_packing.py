"""Recipes pack as NaViT does: images follow the configured sizes instead of piling up at
the row length; images shrunk to fit are flagged, counted and warned about."""

import importlib.util
import logging
import os

import numpy as np
import pytest

from navit_clip.config_loading import load_config
from navit_clip.data import pipeline
from navit_clip.data.counters import data_counters
from navit_clip.data.preprocess import shrunk_share
from navit_clip.data.resolution_sampling import ResolutionSampler, size_for_side

B16_RECIPES = ["siglip_navit_b16", "clip_navit_b16", "lit_navit_b16", "jft_navit_b16"]


def _bench():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "recipe_packing.py")
  spec = importlib.util.spec_from_file_location("recipe_packing", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", B16_RECIPES)
def test_b16_recipes_pack_several_images_a_row_and_rarely_shrink(name):
  config = load_config(name)
  assert pipeline.shrink_share(config) <= 0.25
  packing = _bench().recipe_packing(config, num_images=3000)
  assert packing["shrunk"] <= 0.25
  assert packing["images_per_row"] >= 3.5
  assert packing["padding"] < 0.03


def test_every_shipped_recipe_is_in_the_packing_table():
  assert set(B16_RECIPES) <= set(_bench().recipes())
  assert "siglip_navit_so400m14" in _bench().recipes()


def test_wide_side_range_at_a_short_row_warns(caplog):
  config = load_config("siglip_navit_b16")
  with caplog.at_level(logging.WARNING, logger="navit_clip.data.pipeline"):
    pipeline.warn_if_shrinking(config)
  assert not caplog.records
  config.data.resolution.max_side = 512
  config.data.token_drop.kind = "none"
  with caplog.at_level(logging.WARNING, logger="navit_clip.data.pipeline"):
    share = pipeline.warn_if_shrinking(config)
  assert 0.5 < share < 0.7  # sides above 256 px, about 60% of U(64, 512)
  assert "shrinks about" in caplog.text and "seq_len = 256" in caplog.text


def test_sampler_flags_the_images_it_shrinks():
  sampler = ResolutionSampler("uniform_side", 16, 256, min_side=64, max_side=512)
  rng = np.random.default_rng(0)
  for _ in range(300):
    state = rng.bit_generator.state
    h, w, shrunk = sampler.sample(rng, 375, 500)
    rng.bit_generator.state = state
    side = rng.uniform(64, 512)  # the draw the sampler made
    wanted = size_for_side(375, 500, side, 16, sampler.max_upscale)
    assert shrunk == ((wanted[0] // 16) * (wanted[1] // 16) > 256)
    assert (h // 16) * (w // 16) <= 256
  budget = ResolutionSampler("patch_budget", 16, 256, patch_budget=400)
  assert budget.sample(rng, 375, 500)[2]
  assert not ResolutionSampler("patch_budget", 16, 256, patch_budget=200).sample(
      rng, 375, 500)[2]


@pytest.mark.parametrize("min_side, max_side, expect", [
    (16, 24, "none"), (16, 56, "some"), (48, 56, "all")])
def test_training_counters_count_shrunk_images(tiny_config, caplog, min_side, max_side,
                                               expect):
  config = tiny_config()
  config.data.num_train_examples = 60
  config.data.num_epochs = 1
  config.data.seq_len = 16  # 16 patches of 8 px: a 32 px square
  config.data.resolution.min_side, config.data.resolution.max_side = min_side, max_side
  with caplog.at_level(logging.WARNING, logger="navit_clip.data.pipeline"):
    it = iter(pipeline.make_train_dataset(config, process_index=0, process_count=1))
  images = sum(int(b["image_mask"].sum()) for b in it)
  counters = data_counters(it)
  share = shrunk_share(counters)
  assert images == counters["records"] == 60
  if expect == "none":
    assert share == 0.0 and "noted/shrunk_to_fit" not in counters
  elif expect == "all":
    assert share == 1.0 and "shrinks about 100%" in caplog.text
  else:
    assert 0.0 < share < 1.0
