"""`navit-clip demo`: train a tiny SigLIP NaViT on synthetic shapes, then zero-shot it.

1. Train a SentencePiece BPE tokenizer on the demo captions (once per workdir): at the
   config's 200 pieces it holds every caption word whole.
2. Train configs/demo.py through the Grain pipeline; Orbax checkpoints in the workdir.
3. Zero-shot classify every held-out image by shape, by colour and by both (40 classes),
   with class names x prompt templates, and print the accuracies against chance.
4. Plot the training loss and the zero-shot accuracies (those measured inside training,
   then the final ones) into `demo.png` in the workdir.
"""

from __future__ import annotations

import copy
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
TOKENIZER_MODEL_TYPE = "bpe"
PLOT_NAME = "demo.png"


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
                    lowercase=config.data.tokenizer.lowercase,
                    model_type=TOKENIZER_MODEL_TYPE)


def zero_shot_report(model, config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The zero-shot evaluators of config.evals (configs/demo.py: shape, color, label), each
  on every held-out image (inside training they may read only the first ones)."""
  config = copy.deepcopy(config)
  names = [n for n, e in config.evals.items() if e.kind == "zeroshot"]
  for name in names:
    config.evals[name].max_examples = 0
  return run_all(model, config, names)


def read_history(workdir: str) -> tuple[list[dict], list[dict]]:
  """The (train, eval) records of `workdir`/metrics.jsonl, each in step order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return ([r for r in records if r["split"] == "train"],
          [r for r in records if r["split"] == "eval"])


def _running_mean(values: list[float], n: int) -> list[float]:
  """values[i] averaged with up to n - 1 values before it."""
  return [sum(values[max(0, i + 1 - n):i + 1]) / (i + 1 - max(0, i + 1 - n))
          for i in range(len(values))]


def plot_history(workdir: str, report: dict[str, dict], final_step: int) -> str:
  """Writes `PLOT_NAME` into `workdir`: the training loss by step, and each zero-shot
  task's top-1 by step (inside training, then `report` at `final_step`) against its chance
  level. Returns the PNG's path."""
  import matplotlib  # loaded only here: the rest of the demo needs no plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train_records, eval_records = read_history(workdir)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  steps, losses = [r["step"] for r in train_records], [r["loss"] for r in train_records]
  left.plot(steps, losses, "-", alpha=0.35, label="one step")
  left.plot(steps, _running_mean(losses, 5), "-", label="mean of 5 logged steps")
  left.set_xlabel("training step")
  left.set_ylabel("training loss")
  left.set_title("training loss")
  left.legend(fontsize="small")
  for name, r in report.items():
    points = [(e["step"], e[f"{name}/top1"]) for e in eval_records if f"{name}/top1" in e]
    points = [p for p in points if p[0] < final_step] + [(final_step, r["top1"])]
    steps, top1 = zip(*points)
    line, = right.plot(steps, [100 * a for a in top1], "o-", label=f"{name} top-1")
    right.axhline(100 * r["chance"], color=line.get_color(), linestyle=":",
                  label=f"{name} chance")
  right.set_xlabel("training step")
  right.set_ylabel("zero-shot top-1 on held-out images (%)")
  right.set_title("zero-shot top-1: inside training, then the final report")
  right.set_ylim(0, 100)
  right.legend(fontsize="small", ncol=2)
  for ax in (left, right):
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, PLOT_NAME)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run_demo(workdir: str, config: ml_collections.ConfigDict) -> dict[str, dict]:
  """Runs the demo of `config` (`demo_config`) in `workdir`; prints and returns the report."""
  os.makedirs(workdir, exist_ok=True)
  t0, cpu0 = time.time(), time.process_time()
  train_demo_tokenizer(config)
  result = train(config, workdir)
  t1, cpu1 = time.time(), time.process_time()
  report = zero_shot_report(result.model, config)
  with open(os.path.join(workdir, "zeroshot.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(f"\nzero-shot on {report['shape']['num_images']} held-out images (trained "
        f"{result.final_step} steps in {t1 - t0:.0f}s, {cpu1 - cpu0:.0f} CPU-s; evaluated "
        f"in {time.time() - t1:.0f}s, {time.process_time() - cpu1:.0f} CPU-s):")
  for name, r in report.items():
    print(f"  {name:6s} top-1 {r['top1']:6.1%}  top-5 {r['top5']:6.1%}  "
          f"chance {r['chance']:5.1%}  ({r['top1'] / r['chance']:.1f}x chance)")
  plot = plot_history(workdir, report, result.final_step)
  print(f"workdir: {os.path.abspath(workdir)} (metrics.jsonl, tensorboard/, checkpoints/, "
        "zeroshot.json)")
  print(f"plot of the training loss and the zero-shot accuracies: {os.path.abspath(plot)}")
  return report
