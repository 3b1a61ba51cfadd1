"""The trainer: learns, is deterministic, resumes exactly, serves both tasks."""

import json
import os
import shutil

import numpy as np
import pytest

from navit_clip.train import train


@pytest.mark.slow
def test_contrastive_loss_falls_and_runs_repeat_exactly(tiny_config, tmp_path):
  config = tiny_config(steps=40)
  config.optim.lr = 1e-2
  first = train(config, str(tmp_path / "a"))
  second = train(config, str(tmp_path / "b"))
  assert len(first.losses) == 40
  assert first.losses == second.losses  # same seed: bitwise the same on CPU
  assert np.mean(first.losses[-8:]) < 0.8 * np.mean(first.losses[:8])


def test_workdir_gets_config_metrics_and_checkpoint(tiny_config, tmp_path):
  config = tiny_config(steps=4)
  result = train(config, str(tmp_path))
  assert result.final_step == 4
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["image"]["variant"] == "mu/8"
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4]
  for key in ("loss", "lr", "t", "b", "images_per_s", "tokens_per_s", "padding",
              "images_per_row", "data_wait_frac", "mfu", "shrunk_share"):
    assert np.isfinite(records[0][key]), key
  assert os.listdir(tmp_path / "checkpoints") == ["4"]


@pytest.mark.slow
def test_the_log_reports_the_share_of_images_shrunk_to_fit_a_row(tiny_config, tmp_path):
  config = tiny_config(steps=4)
  config.data.resolution.update(min_side=64, max_side=120)  # up to 225 patches, rows of 64
  train(config, str(tmp_path))
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  used = record["data/records"] - record["data/skipped"]
  assert 0 < record["shrunk_share"] == record["data/noted/shrunk_to_fit"] / used <= 1


def test_resume_continues_exactly_where_the_unbroken_run_would_be(tiny_config, tmp_path):
  config = tiny_config(steps=8)
  config.train.checkpoint_every = 5
  unbroken = train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5", "8"]
  shutil.rmtree(tmp_path / "checkpoints" / "8")  # as if stopped between steps 5 and 8
  resumed = train(config, str(tmp_path))
  assert resumed.losses == unbroken.losses[5:]
  # The rows the first run logged after step 5 were dropped: the log reads as one run.
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4, 8]
  assert records[1]["loss"] == unbroken.losses[-1]


def test_classification_mode_trains(tiny_config, tmp_path):
  config = tiny_config("demo_classification", steps=80)
  config.data.label_field, config.model.num_classes = "color", 8  # learnable in seconds
  config.optim.lr = 3e-3
  config.train.log_every = 20
  result = train(config, str(tmp_path))
  assert len(result.losses) == 80 and all(np.isfinite(result.losses))
  assert np.mean(result.losses[-10:]) < 0.8 * np.mean(result.losses[:10])
