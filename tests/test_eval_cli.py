"""The eval / embed / export commands on a trained workdir, and restoring its parameters."""

import json
import os

import jax
import numpy as np
from flax import nnx

from navit_clip import cli
from navit_clip.evaluate.restore import checkpoint_steps, restore_model


def test_restore_reads_the_trained_parameters(trained_demo_workdir):
  restored = restore_model(trained_demo_workdir, step=200)
  assert checkpoint_steps(trained_demo_workdir) == [200]
  params = nnx.to_pure_dict(nnx.state(restored.model, nnx.Param))
  fresh = nnx.to_pure_dict(nnx.state(
      type(restored.model)(restored.config, rngs=nnx.Rngs(0)), nnx.Param))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       params, fresh)
  assert max(jax.tree.leaves(moved)) > 0.01  # trained, not initialised


def test_eval_command_sweeps_budgets_and_writes_json_and_plot(trained_demo_workdir, capsys):
  cli.main(["eval", "--workdir", trained_demo_workdir, "--only", "color",
            "--budgets", "16,64", "--config.evals.color.max_examples=40"])
  printed = json.loads(capsys.readouterr().out)
  saved = json.load(open(os.path.join(trained_demo_workdir, "eval_step200.json")))
  assert printed == saved
  assert saved["evals"]["color"]["num_images"] == 40
  rows = saved["evals"]["color_resolutions"]["rows"]
  assert [r["budget"] for r in rows] == [16, 64]
  assert rows[0]["tokens_per_image"] < rows[1]["tokens_per_image"] <= 64
  assert os.path.getsize(os.path.join(trained_demo_workdir,
                                      "resolutions_color_resolutions.png")) > 1000


def test_embed_command_writes_texts_and_images(trained_demo_workdir, tmp_path, capsys):
  texts = tmp_path / "texts.txt"
  texts.write_text("a red circle\n\nblue square\n")
  cli.main(["embed", "--workdir", trained_demo_workdir, "--texts", str(texts),
            "--out", str(tmp_path / "t"), "--no-progress"])
  assert np.load(tmp_path / "t.npy").shape == (2, 32)
  cli.main(["embed", "--workdir", trained_demo_workdir, "--images", "demo",
            "--out", str(tmp_path / "d"), "--no-progress", "--resolution", "budget:32"])
  meta = [json.loads(x) for x in open(tmp_path / "d.jsonl")]
  assert len(meta) == 200 and meta[0] == {"index": 0, "id": 1_000_000_000}
  capsys.readouterr()
