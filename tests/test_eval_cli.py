"""The eval / embed / export commands on a trained workdir, restoring its parameters, and
zero-shot class names against the labels of class folders."""

import json
import logging
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from navit_clip import cli
from navit_clip.data.sources.demo import DemoSource, zero_shot_tasks
from navit_clip.evaluate.restore import checkpoint_steps, restore_model
from navit_clip.evaluate.runner import label_order


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


def _relative_to_cwd(monkeypatch, workdir: str) -> str:
  monkeypatch.chdir(os.path.dirname(workdir))
  return os.path.basename(workdir)


def test_eval_and_embed_take_a_relative_workdir(trained_demo_workdir, tmp_path, monkeypatch,
                                                capsys):
  workdir = _relative_to_cwd(monkeypatch, trained_demo_workdir)
  assert cli.main(["eval", "--workdir", workdir, "--only", "color",
                   "--config.evals.color.max_examples=8"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["workdir"] == trained_demo_workdir and report["step"] == 200
  texts = tmp_path / "texts.txt"
  texts.write_text("a red circle\n")
  assert cli.main(["embed", "--workdir", workdir, "--texts", str(texts),
                   "--out", str(tmp_path / "t"), "--no-progress"]) == 0
  assert np.load(tmp_path / "t.npy").shape == (1, 32)
  capsys.readouterr()


def test_export_takes_a_relative_workdir_and_refuses_to_overwrite(trained_demo_workdir,
                                                                  tmp_path, monkeypatch,
                                                                  capsys):
  workdir = _relative_to_cwd(monkeypatch, trained_demo_workdir)
  out = tmp_path / "export"
  args = ["export", "--workdir", workdir, "--out", str(out), "--resolution", "budget:16"]
  assert cli.main(args) == 0
  manifest = json.loads(capsys.readouterr().out)
  assert sorted(manifest["files"]) == ["image_encoder.jax_export", "text_encoder.jax_export",
                                       "tokenizer.model"]
  written = (out / "export.json").stat().st_mtime_ns
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err == (f"navit-clip: error: export directory {str(out)!r} is not empty; choose "
                 "another one or pass --overwrite to replace the export in it\n")
  assert (out / "export.json").stat().st_mtime_ns == written
  (out / "notes.txt").write_text("mine")
  (out / "saved_model").mkdir()  # left by an earlier --tf export
  assert cli.main(args + ["--overwrite", "--batch-size", "2"]) == 0
  assert json.loads(capsys.readouterr().out)["batch_spec"]["batch_size"] == 2
  assert sorted(os.listdir(out)) == ["export.json", "image_encoder.jax_export", "notes.txt",
                                     "text_encoder.jax_export", "tokenizer.model"]


def test_export_refuses_a_file_as_its_directory(tmp_path):
  from navit_clip.errors import UserError
  from navit_clip.serving_export import prepare_out_dir
  (tmp_path / "f").write_text("x")
  with pytest.raises(UserError, match="is a file"):
    prepare_out_dir(str(tmp_path / "f"))
  prepare_out_dir(str(tmp_path / "new" / "dir"))
  assert os.path.isdir(tmp_path / "new" / "dir")


COLORS = zero_shot_tasks()["color"].classnames  # label order of the demo: red, green, ...


@pytest.fixture(scope="module")
def color_folders(tmp_path_factory) -> str:
  """48 held-out demo images in ImageNet-style folders root/<colour>/ (sorted: black, ...)."""
  root = tmp_path_factory.mktemp("color_folders")
  source = DemoSource("eval", num_examples=48)
  for i in range(len(source)):
    record = source[i]
    folder = root / COLORS[record["color"]]
    folder.mkdir(exist_ok=True)
    Image.fromarray(record["image"]).save(folder / f"{i}.png")
  return str(root)


def _zero_shot(workdir: str, folders: str, capsys, *extra: str) -> dict:
  assert cli.main(["eval", "--workdir", workdir, "--only", "cli_zeroshot", "--zeroshot",
                   f"folder:{folders}", "--templates", "clip_short", *extra]) == 0
  return json.loads(capsys.readouterr().out)["evals"]["cli_zeroshot"]


def test_classnames_in_another_order_than_the_folders_are_matched_by_name(
    trained_demo_workdir, color_folders, tmp_path, capsys, caplog):
  by_folder = _zero_shot(trained_demo_workdir, color_folders, capsys)
  names = tmp_path / "colors.txt"  # the demo's order, not the folders' sorted order
  names.write_text("\n".join(c.upper() for c in COLORS) + "\n")
  caplog.set_level(logging.INFO, logger="navit_clip")
  by_file = _zero_shot(trained_demo_workdir, color_folders, capsys, "--classnames", str(names))
  assert by_file["per_class_top1"] == by_folder["per_class_top1"]
  assert by_file["top1"] == by_folder["top1"] > 1.5 * by_file["chance"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("in another order than its labels; matched them by name" in w for w in warnings)


def test_classnames_that_do_not_match_are_positional_and_logged(caplog):
  folders = ("n02", "n01_b", "n03")
  caplog.set_level(logging.INFO, logger="navit_clip")
  assert label_order(["goldfish", "tench", "shark"], folders, "names.txt",
                     "folder:x") == ["goldfish", "tench", "shark"]
  (info,) = [r.getMessage() for r in caplog.records]
  assert "by position" in info and "  0: n02 -> goldfish\n  1: n01_b -> tench" in info
  caplog.clear()
  label_order(["goldfish", "tench", "shark"], folders, "names.txt", "folder:x")
  assert not caplog.records  # logged once per dataset and names
  assert label_order(["Golden_Retriever", "cat"], ["cat", "golden retriever"], "f", "d") == [
      "cat", "Golden_Retriever"]
  with pytest.raises(ValueError, match="has 2 names but dataset 'd2' has 3 classes"):
    label_order(["a", "b"], ["a", "b", "c"], "f", "d2")


def test_classnames_of_more_classes_than_the_folders_hold_are_matched_by_name(caplog):
  assert label_order(COLORS, ["black", "red"], "colors.txt", "folder:c") == ["black", "red"]
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert "lists the 2 classes of 'folder:c' in another order" in warning
  assert "and 6 names of no class (left out)" in warning


def test_names_that_are_other_folders_of_a_different_set_warn(caplog):
  caplog.set_level(logging.INFO, logger="navit_clip")
  label_order(["dog", "cat", "cow"], ["cat", "dog", "emu"], "pets.txt", "folder:p")
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert "2 names are classes of 'folder:p' at other labels" in warning
  assert "'dog' is listed as label 0 but is class 1" in warning
