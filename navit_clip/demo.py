"""`navit-clip demo`: train a tiny SigLIP NaViT on synthetic shapes, then zero-shot it.

1. Train a SentencePiece tokenizer on the demo captions (once per workdir).
2. Train configs/demo.py through the Grain pipeline; Orbax checkpoints in the workdir.
3. Zero-shot classify held-out images by shape, by colour and by both (40 classes), with
   class names x prompt templates, and print the accuracies against chance.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from navit_clip.config_loading import apply_overrides, load_config
from navit_clip.data.sources import demo as demo_data
from navit_clip.evaluate.runner import run_all
from navit_clip.text.tokenizer import train_tokenizer
from navit_clip.train import train

TOKENIZER_CORPUS = 20_000  # demo captions the tokenizer is trained on


def demo_config(workdir: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """configs/demo.py with `overrides`, reading its tokenizer from `workdir`."""
  config = load_config("demo")
  apply_overrides(config, list(overrides))
  config.data.tokenizer.path = os.path.join(workdir, "tokenizer.model")
  return config


def train_demo_tokenizer(config: ml_collections.ConfigDict) -> None:
  """Trains the tokenizer on demo captions into config.data.tokenizer.path if missing."""
  path = config.data.tokenizer.path
  if not os.path.exists(path):
    train_tokenizer(demo_data.caption_corpus(TOKENIZER_CORPUS, config.data.source_seed),
                    config.model.text.vocab_size, path,
                    lowercase=config.data.tokenizer.lowercase)


def zero_shot_report(model, config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The zero-shot evaluators of config.evals (configs/demo.py: shape, color, label)."""
  names = [n for n, e in config.evals.items() if e.kind == "zeroshot"]
  return run_all(model, config, names)


def run_demo(workdir: str, config: ml_collections.ConfigDict) -> dict[str, dict]:
  """Runs the demo of `config` (`demo_config`) in `workdir`; prints and returns the report."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  train_demo_tokenizer(config)
  result = train(config, workdir)
  train_s = time.time() - t0
  report = zero_shot_report(result.model, config)
  with open(os.path.join(workdir, "zeroshot.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(f"\nzero-shot on {report['shape']['num_images']} held-out images "
        f"(trained {result.final_step} steps in {train_s:.0f}s):")
  for name, r in report.items():
    print(f"  {name:6s} top-1 {r['top1']:6.1%}  top-5 {r['top5']:6.1%}  "
          f"chance {r['chance']:5.1%}  ({r['top1'] / r['chance']:.1f}x chance)")
  print(f"workdir: {os.path.abspath(workdir)} (metrics.jsonl, tensorboard/, checkpoints/, "
        "zeroshot.json)")
  return report
