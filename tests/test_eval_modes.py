"""The fewshot and classification evaluators through the runner, for both tasks: on demo
data and class folders, inside training and in `navit-clip eval`; kinds that need the other
task's model are refused."""

import json
import os

import numpy as np
import pytest
from data_fixtures import encode
from flax import nnx

from navit_clip import cli
from navit_clip.config import eval_config, validate
from navit_clip.errors import UserError
from navit_clip.evaluate.runner import run_all, scalar_metrics
from navit_clip.model import build_model
from navit_clip.train import train

SMALL = dict(resolution="budget:16", max_examples=64)  # 64 held-out demo images, 16 patches


def _random_model(config):
  return build_model(config, rngs=nnx.Rngs(0))


def _check_fewshot(out, num_classes, shots=(1, 2)):
  assert out["num_classes"] == num_classes and out["skipped"] == 0
  for n in shots:
    assert 0.0 <= out[f"{n}shot"] <= 1.0 and len(out[f"{n}shot_per_seed"]) == 2


@pytest.mark.parametrize("name", ["demo", "demo_classification"])
def test_fewshot_probes_either_model_s_image_embeddings(tiny_config, name):
  config = tiny_config(name)
  config.evals.fs = eval_config("fewshot", "demo:color", shots="1,2", seeds="0,1", **SMALL)
  out = run_all(_random_model(config), config, ["fs"])["fs"]
  _check_fewshot(out, 8)
  assert out["pool_images"] + out["num_images"] == 64  # every other image: shots, scored
  assert out["pool_images"] == 32
  assert "fs/1shot" in scalar_metrics({"fs": out})


def _class_folders(root, seed):
  """Two class folders of 12 noisy red and blue JPEGs each."""
  rng = np.random.default_rng(seed)
  for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
    os.makedirs(root / name)
    for i in range(12):
      image = np.clip(np.array(rgb) + rng.normal(0, 20, (24, 32, 3)), 0, 255)
      (root / name / f"{i}.jpg").write_bytes(encode(image.astype(np.uint8)))
  return f"folder:{root}"


def test_fewshot_draws_shots_from_a_train_dataset_of_class_folders(tiny_config, tmp_path):
  config = tiny_config()
  train_dir = _class_folders(tmp_path / "train", 0)
  test_dir = _class_folders(tmp_path / "test", 1)
  config.evals.fs = eval_config("fewshot", test_dir, train_dataset=train_dir, shots="1,5",
                                seeds="0,1", resolution="budget:16")
  out = run_all(_random_model(config), config, ["fs"])["fs"]
  assert (out["pool_images"], out["num_images"]) == (24, 24)
  _check_fewshot(out, 2, shots=(1, 5))
  assert out["5shot"] >= 0.9  # red and blue: apart even in a random tower's embeddings


@pytest.mark.parametrize("loss,metrics", [("softmax_xent", ("top1", "top5", "chance")),
                                          ("sigmoid_xent", ("prec1", "map"))])
def test_classification_evaluator_scores_a_classifier_s_own_logits(tiny_config, loss,
                                                                   metrics):
  config = tiny_config("demo_classification")
  config.loss.name = loss
  config.evals.cls = eval_config("classification", "demo:label", **SMALL)
  out = run_all(_random_model(config), config, ["cls"])["cls"]
  assert out["num_images"] == 64 and out["skipped"] == 0
  for key in metrics + ("loss",):
    assert np.isfinite(out[key]), key
  if loss == "sigmoid_xent":  # multi-hot labels: one positive per image here
    assert out["map_classes"] > 1


def test_kinds_for_the_other_task_are_refused(tiny_config):
  contrastive, classifier = tiny_config(), tiny_config("demo_classification")
  contrastive.evals.cls = eval_config("classification", "demo:label", **SMALL)
  with pytest.raises(UserError, match="classification needs a classification model"):
    run_all(_random_model(contrastive), contrastive, ["cls"])
  classifier.evals.zs = eval_config("zeroshot", "demo:color", **SMALL)
  with pytest.raises(UserError, match="zeroshot embeds texts and needs a contrastive model"):
    run_all(_random_model(classifier), classifier, ["zs"])
  classifier.evals.cls = eval_config("classification", "demo:color", **SMALL)
  with pytest.raises(UserError, match="has 8 classes but the model has config.model"):
    run_all(_random_model(classifier), classifier, ["cls"])


@pytest.mark.parametrize("overrides,message", [
    (dict(kind="fewshot", shots="0,5"), r"evals\.e\.shots = '0,5': shots = 0 must be >= 1"),
    (dict(kind="fewshot", seeds="a"), r"evals\.e\.seeds = 'a': expected a comma-separated"),
    (dict(kind="zeroshot", train_dataset="demo:color"), r"train_dataset applies to fewshot"),
    (dict(kind="classification", classnames="imagenet"), r"apply to zero-shot, not class"),
])
def test_evaluator_keys_are_checked(tiny_config, overrides, message):
  config = tiny_config()
  config.evals.e = eval_config(overrides.pop("kind"), "demo:color", **overrides)
  with pytest.raises(ValueError, match=message):
    validate(config)


@pytest.mark.slow
def test_a_trained_classifier_beats_chance_in_training_and_in_the_eval_command(
    tiny_config, tmp_path, capsys):
  config = tiny_config("demo_classification", steps=80)
  config.data.label_field, config.model.num_classes = "color", 8  # learnable in seconds
  config.train.log_every = 40
  held_out = dict(resolution="budget:24", max_examples=160)  # near the training sizes
  config.evals.label.update(dataset="demo:color", every_steps=80, **held_out)  # the recipe's
  config.evals.label_fewshot.update(dataset="demo:color", shots="1,5", seeds="0,1",
                                    **held_out)
  train(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  in_training = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in in_training] == [80]  # the fewshot evaluator is standalone
  assert "label/top1" in in_training[0] and "label_fewshot/1shot" not in in_training[0]
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 0
  report = json.loads(capsys.readouterr().out)["evals"]
  label, fewshot = report["label"], report["label_fewshot"]
  assert label["top1"] == pytest.approx(in_training[0]["label/top1"])
  assert label["top1"] > 2 * label["chance"], label
  assert fewshot["5shot"] > 2 * fewshot["chance"], fewshot
