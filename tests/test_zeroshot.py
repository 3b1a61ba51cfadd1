"""Zero-shot classification: shipped prompts, class embeddings, accuracy on a trained model."""

import json

import numpy as np
import pytest

from navit_clip.config import eval_config, validate
from navit_clip.evaluate import prompts, zeroshot
from navit_clip.evaluate.embedder import Embedder
from navit_clip.evaluate.restore import restore_model
from navit_clip.evaluate.runner import run_all, run_evals, scalar_metrics
from navit_clip.data.pipeline import make_tokenizer


def test_shipped_lists():
  classes = prompts.load_classnames("imagenet")
  assert len(classes) == 1000 and classes[0] == "tench" and classes[-1] == "toilet paper"
  assert len(prompts.load_templates("clip")) == 80
  assert len(prompts.load_templates("clip_short")) == 7


def test_custom_lists_from_text_and_json(tmp_path):
  txt = tmp_path / "classes.txt"
  txt.write_text("# animals\ncat\n\ndog\n")
  assert prompts.load_classnames(str(txt)) == ["cat", "dog"]
  js = tmp_path / "t.json"
  js.write_text(json.dumps({"templates": ["a {}.", "the {}!"]}))
  assert prompts.load_templates(str(js)) == ["a {}.", "the {}!"]
  bad = tmp_path / "bad.txt"
  bad.write_text("no placeholder\n")
  with pytest.raises(ValueError, match="exactly one"):
    prompts.load_templates(str(bad))
  with pytest.raises(FileNotFoundError, match="shipped list"):
    prompts.load_classnames("nonexistent")


def test_accuracy_top1_top5_per_class():
  classifier = np.eye(3, dtype=np.float32)
  images = np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0, 0, 1]], np.float32)
  labels = np.array([0, 1, 1, 2])
  out = zeroshot.accuracy(images, labels, classifier)
  assert out["top1"] == 0.75 and out["top5"] == 1.0
  assert out["per_class_top1"] == [1.0, 0.5, 1.0]


def test_zero_shot_beats_chance_by_a_wide_margin(trained_demo_workdir):
  restored = restore_model(trained_demo_workdir)
  config = restored.config
  assert restored.step == 200
  names = ["shape", "color", "label"]  # configs/demo.py's evaluators
  assert all(n in config.evals for n in names)
  report = run_all(restored.model, config, ["color"])["color"]
  assert report["num_images"] == 200 and report["skipped"] == 0
  assert report["top1"] > 2.5 * report["chance"], report["top1"]
  assert report["top5"] > report["top1"]
  assert len(report["per_class_top1"]) == 8


def test_class_embeddings_are_renormalised_template_means(trained_demo_workdir):
  restored = restore_model(trained_demo_workdir)
  tokenizer = make_tokenizer(restored.config)
  embedder = Embedder(restored.model)
  templates = ["a {} shape.", "something {}."]
  got = zeroshot.class_embeddings(embedder, tokenizer, ["red", "blue"], templates)
  texts = embedder.texts(tokenizer.encode([t.format("red") for t in templates]))
  mean = texts.mean(axis=0)
  np.testing.assert_allclose(got[0], mean / np.linalg.norm(mean), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_run_evals_runs_only_due_evaluators(trained_demo_workdir):
  restored = restore_model(trained_demo_workdir)
  config = restored.config
  config.evals.color.every_steps = 10
  config.evals.color.max_examples = 30
  assert run_evals(restored.model, config, step=5) == {}
  results = run_evals(restored.model, config, step=20)
  assert list(results) == ["color"]
  metrics = scalar_metrics(results)
  assert 0.0 <= metrics["color/top1"] <= 1.0 and "color/per_class_top1" not in metrics


def test_eval_config_validation(tiny_config):
  config = tiny_config()
  config.evals.bad = eval_config("zeroshot", "demo:color", resolution="budget:0")
  with pytest.raises(ValueError, match="evals.bad"):
    validate(config)
  config.evals.bad = eval_config("nearest", "demo:color")
  with pytest.raises(ValueError, match="evals.bad.kind"):
    validate(config)
