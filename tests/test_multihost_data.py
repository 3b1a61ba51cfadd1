"""The processes of a multi-host run draw their own data: their own shuffle, resolutions,
drop rates and captions; together one epoch each record once; the token-drop schedule on
the run's clock (images seen by all processes)."""

import numpy as np
import pytest

from navit_clip.data import pipeline
from navit_clip.data.sources.demo import COLORS
from navit_clip.data.token_drop import schedule_value

NUM_RECORDS = 400


@pytest.fixture
def config(tiny_config):
  c = tiny_config()
  c.data.num_train_examples = NUM_RECORDS
  c.data.num_epochs = 1
  c.data.resolution.min_side = 16
  c.data.packer = "first_fit"  # one open row: images leave in the order they arrive
  c.data.pack_bins = 1
  return c


def _images(config, process_index: int, process_count: int = 2) -> dict[str, np.ndarray]:
  """Per image of one process, in its stream order: example id, grid patches, kept."""
  ids, full, kept = [], [], []
  for b in pipeline.make_train_dataset(config, process_index=process_index,
                                       process_count=process_count):
    for r, k in zip(*np.nonzero(b["image_mask"])):
      tokens = b["segment_ids"][r] == k + 1
      ids.append(b["example_id"][r, k])
      full.append(np.prod(b["grid_hw"][r][tokens][0]))
      kept.append(tokens.sum())
  return {"id": np.array(ids), "full": np.array(full), "kept": np.array(kept)}


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
  n = min(len(a), len(b))
  return float(np.corrcoef(a[:n], b[:n])[0, 1])


def test_processes_draw_independent_sizes_and_drop_rates(config):
  config.data.token_drop.kind = "beta"
  config.data.token_drop.rate = 0.4
  p0, p1 = _images(config, 0), _images(config, 1)
  assert len(p0["id"]) == len(p1["id"]) == NUM_RECORDS // 2
  # At equal local index the processes hold unrelated records ...
  assert np.mean(np.abs(p1["id"] - p0["id"]) == 1) < 0.1
  # ... of unrelated sizes and drop rates (equal seeds would correlate them near 1).
  assert abs(_correlation(p0["full"], p1["full"])) < 0.3
  drop0, drop1 = 1 - p0["kept"] / p0["full"], 1 - p1["kept"] / p1["full"]
  assert drop0.std() > 0.1 and abs(_correlation(drop0, drop1)) < 0.3


def test_processes_together_see_every_record_once_per_epoch(config):
  config.data.num_epochs = 2
  shards = [_images(config, p)["id"] for p in range(2)]
  half = NUM_RECORDS // 2  # each process's share of one epoch
  for epoch in range(2):
    seen = np.concatenate([s[epoch * half:(epoch + 1) * half] for s in shards])
    assert sorted(seen.tolist()) == list(range(NUM_RECORDS))


def test_drop_schedule_runs_on_the_images_of_all_processes(config):
  schedule_images = NUM_RECORDS // 2
  d = config.data.token_drop
  d.kind, d.schedule = "constant", True
  d.schedule_start, d.schedule_end, d.schedule_images = 0.0, 0.8, schedule_images
  config.data.resolution.kind = "patch_budget"
  config.data.resolution.patch_budget = 64
  for p in range(2):
    images = _images(config, p)
    observed = 1 - images["kept"] / images["full"]
    seen = 2 * np.arange(len(observed)) + p  # the run's images before this one
    expected = np.array([schedule_value(g, 0.0, 0.8, schedule_images) for g in seen])
    # The kept count is n (1 - rate) rounded stochastically: within one token.
    np.testing.assert_array_less(np.abs(observed - expected), 1 / images["full"] + 1e-9)
    midpoint = np.abs(seen - schedule_images // 2) <= 2
    np.testing.assert_allclose(observed[midpoint], 0.4, atol=0.05)


def test_processes_choose_captions_independently(config):
  captions = [f"a {color} circle" for color in COLORS]  # eight captions, distinct tokens
  record = {"image": np.zeros((32, 32, 3), np.uint8), "example_id": 0, "caption": captions}
  preprocessors = [pipeline.make_preprocessor(config, seed=0, process_index=p,
                                              process_count=2) for p in range(2)]
  chosen = [[tuple(pre(i, record)["text_tokens"]) for i in range(40)] for pre in preprocessors]
  assert np.mean([a == b for a, b in zip(*chosen)]) < 0.4  # 1/8 when independent
