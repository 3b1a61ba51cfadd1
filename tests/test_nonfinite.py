"""NaN in the loss and gradients: never applied; the run stops or skips the step."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from navit_clip import cli, sharding
from navit_clip.model import TwoTower
from navit_clip.nonfinite import NonfiniteMonitor, keep_if_finite
from navit_clip.train import train

BAD_STEP = 3


@pytest.fixture
def poison_step(monkeypatch):
  """Makes step BAD_STEP's loss and gradients NaN (test-only model and feed changes).

  The feed empties that step's batch (no image slot in use) and the model's loss turns
  NaN on a batch without images.
  """
  calls = {"n": 0}
  global_batch, loss = sharding.global_batch, TwoTower.loss

  def feed(host_batch, mesh, rows):
    calls["n"] += 1
    if calls["n"] == BAD_STEP:
      host_batch = dict(host_batch, image_mask=np.zeros_like(host_batch["image_mask"]))
    return global_batch(host_batch, mesh, rows)

  def nan_without_images(self, batch):
    value, aux = loss(self, batch)
    return value * jnp.where(jnp.any(batch["image_mask"]), 1.0, jnp.nan), aux

  monkeypatch.setattr(sharding, "global_batch", feed)
  monkeypatch.setattr(TwoTower, "loss", nan_without_images)


def test_keep_if_finite_selects_the_old_state():
  new, old = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
  kept, flag = keep_if_finite(jnp.float32(1.0), jnp.float32(2.0), new, old)
  assert float(flag) == 0.0 and np.all(kept["w"] == 1.0)
  for loss, norm in ((jnp.nan, 1.0), (1.0, jnp.inf)):
    kept, flag = keep_if_finite(jnp.float32(loss), jnp.float32(norm), new, old)
    assert float(flag) == 1.0 and np.all(kept["w"] == 0.0)


def test_skip_mode_logs_a_warning_naming_the_steps(caplog):
  monitor = NonfiniteMonitor("skip", checkpoints=None)
  for step, loss in ((1, 0.5), (2, np.nan), (3, np.inf)):
    monitor.record(step, {"loss": jnp.float32(loss), "nonfinite": jnp.float32(step > 1)})
  with caplog.at_level("WARNING", logger="navit_clip.nonfinite"):
    monitor.check()
  assert monitor.skipped == 2
  [record] = caplog.records
  assert record.levelname == "WARNING"
  assert record.getMessage() == ("non-finite loss or gradients at 2 steps in 2..3; skipped "
                                 "those updates (2 skipped so far)")


def test_stop_mode_raises_naming_the_step_and_the_last_good_checkpoint(
    tiny_config, tmp_path, poison_step):
  config = tiny_config(steps=8)
  config.train.checkpoint_every = 2
  last_good = re.escape(f"Last good checkpoint: step 2 in {tmp_path}/checkpoints")
  with pytest.raises(FloatingPointError, match=f"at step 3 .*{last_good}"):
    train(config, str(tmp_path))
  # The check runs before each save: nothing after the bad step was written.
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_skip_mode_leaves_params_and_optimizer_state_unchanged(tiny_config, tmp_path,
                                                                poison_step):
  config = tiny_config(steps=5)
  config.train.nonfinite = "skip"
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 10
  result = train(config, str(tmp_path))
  assert result.final_step == 5
  assert np.isnan(result.losses[BAD_STEP - 1])
  assert np.all(np.isfinite(np.delete(result.losses, BAD_STEP - 1)))
  before, after, later = (ocp.StandardCheckpointer().restore(
      tmp_path / "checkpoints" / str(s) / "state") for s in (BAD_STEP - 1, BAD_STEP, BAD_STEP + 1))
  assert int(after["step"]) == BAD_STEP  # the batch was consumed
  for name in ("params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
  assert not np.array_equal(later["params"]["text"]["proj"]["kernel"],
                            after["params"]["text"]["proj"]["kernel"])
  records = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert '"nonfinite_steps": 1.0' in records[-1]


def test_keep_if_finite_refuses_an_update_that_overflows():
  new, old = {"w": jnp.array([1.0, jnp.inf]), "n": jnp.int32(3)}, {"w": jnp.zeros(2),
                                                                   "n": jnp.int32(2)}
  kept, flag = keep_if_finite(jnp.float32(1.0), jnp.float32(2.0), new, old)
  assert float(flag) == 1.0 and np.all(kept["w"] == 0.0) and int(kept["n"]) == 2


def test_skip_mode_stops_after_too_many_non_finite_steps_in_a_row(tiny_config, tmp_path):
  config = tiny_config(steps=20)
  config.optim.lr = 1e30  # t = exp(t') overflows after the first updates: every loss is NaN
  config.train.nonfinite = "skip"
  config.train.max_consecutive_nonfinite = 5
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 30
  with pytest.raises(FloatingPointError, match=r"5 non-finite steps in a row, up to step \d+ "
                     r"\(config.train.max_consecutive_nonfinite = 5\)") as stopped:
    train(config, str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert saved and saved[-1] < 20
  last_step = int(re.search(r"up to step (\d+)", str(stopped.value))[1])
  assert saved[-1] == last_step - 1  # checked before each save: the 5th skip is not saved
  assert (f"Last good checkpoint: step {saved[-1]} in {tmp_path}/checkpoints"
          in str(stopped.value))
  for step in saved:  # what was saved holds only finite values
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"])), step


def test_the_count_of_skipped_steps_survives_a_resume(tiny_config, tmp_path, poison_step,
                                                      monkeypatch):
  config = tiny_config(steps=4)
  config.train.nonfinite = "skip"
  config.train.checkpoint_every = 2
  train(config, str(tmp_path))  # step BAD_STEP is skipped
  monkeypatch.undo()  # no more poisoned steps
  config.train.total_steps = 6
  train(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["nonfinite_steps"]) for r in rows] == [(4, 1.0), (6, 1.0)]


@pytest.mark.slow
def test_a_run_that_diverges_ends_the_command_in_one_line_with_exit_2(
    demo_tokenizer_path, tmp_path, capsys):
  tiny = {"model.image.variant": "mu/8", "model.text.variant": "mu",
          "data.tokenizer.path": demo_tokenizer_path, "data.batch_size": 4,
          "data.seq_len": 64, "data.max_images": 6, "data.resolution.max_side": 48,
          "data.pack_window": 16, "data.num_workers": 0,
          "train.total_steps": 8, "train.log_every": 2,
          "train.checkpoint_every": 2, "train.peak_flops": 1e11, "train.tensorboard": False,
          "optim.warmup_steps": 2,
          "optim.lr": 1e30}  # t = exp(t') overflows after the first updates: the loss is NaN
  argv = ["train", "--config", "demo", "--workdir", str(tmp_path / "run"),
          *[f"--config.{k}={v}" for k, v in tiny.items()]]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert re.fullmatch(r"navit-clip: error: non-finite loss or gradients at .*"
                      r"Last good checkpoint: .*config\.train\.nonfinite = 'skip'.*", last), last
