"""Checkpoint cost in the trainer: blocking and total save time, and its share of step time.

For the demo config and for S/16 + S text at L=256, three runs of the real trainer:
  no saves in the loop              -> step time without checkpoints;
  async saves every EVERY steps     -> the time `save()` blocks the loop (device-to-host copy
                                       and dispatch), and the step time with saves;
  saves waited for, every EVERY     -> the total time of one save (written and committed).
The share is blocking time / (EVERY x step time): the cost of async checkpointing at that
interval. Step times are the second half of each run (warm caches). On a CPU-only host the
background write shares the cores with the step, so "w/ saves" rises by more than the
blocking share; on an accelerator the step runs on the device while the host writes.
Run: .venv/bin/python bench/checkpoint.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from navit_clip import train as train_lib
from navit_clip.checkpoint import Checkpointer
from navit_clip.config_loading import apply_overrides, load_config
from navit_clip.data.sources.demo import caption_corpus
from navit_clip.text.tokenizer import train_tokenizer

EVERY = 2
CASES = {
    "demo (nano/8, B=16, L=128)": [],
    "S/16, B=8, L=256, text S": [
        "model.image.variant=S/16", "model.text.variant=S", "data.batch_size=8",
        "data.seq_len=256", "data.max_images=8", "data.resolution.min_side=64",
        "data.resolution.max_side=256", "model.image.posemb_resolution=64"],
}


class TimedCheckpointer(Checkpointer):
  """Records how long each save call blocks; with `wait_each`, how long until written."""

  wait_each = False
  times: list[float] = []

  def save(self, step, state, data_iterator=None, **kwargs):
    start = time.perf_counter()
    began = super().save(step, state, data_iterator, **kwargs)
    if self.wait_each:
      self.wait()
    TimedCheckpointer.times.append(time.perf_counter() - start)
    return began


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def run(overrides: list[str], tokenizer: str, steps: int, every: int, wait_each: bool,
        workdir: str) -> tuple[float, list[float], int]:
  """(step time s, save times s, bytes of one checkpoint) of one training run."""
  config = load_config("demo")
  apply_overrides(config, overrides + [
      f"train.total_steps={steps}", f"train.log_every={steps // 2}", "optim.warmup_steps=1",
      "train.tensorboard=false", "train.peak_flops=1e11", f"train.checkpoint_every={every}"])
  config.data.tokenizer.path = tokenizer
  TimedCheckpointer.wait_each, TimedCheckpointer.times = wait_each, []
  train_lib.Checkpointer = TimedCheckpointer
  train_lib.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    step_time = json.loads(f.read().splitlines()[-1])["step_time"]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  size = _dir_bytes(os.path.join(ckpt_dir, max(os.listdir(ckpt_dir), key=int)))
  return step_time, TimedCheckpointer.times, size


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps")
  args = parser.parse_args()
  steps = 8 if args.quick else 20
  rows = []
  with tempfile.TemporaryDirectory() as root:
    tokenizer = os.path.join(root, "tok.model")
    train_tokenizer(caption_corpus(4000), 64, tokenizer, lowercase=True)
    for i, (name, overrides) in enumerate(CASES.items()):
      base, _, size = run(overrides, tokenizer, steps, steps + 1, False, f"{root}/{i}a")
      with_ckpt, blocking, _ = run(overrides, tokenizer, steps, EVERY, False, f"{root}/{i}b")
      _, total, _ = run(overrides, tokenizer, steps, EVERY, True, f"{root}/{i}c")
      rows.append((name, size, base, with_ckpt, statistics.median(blocking),
                   statistics.median(total)))
  print(f"\nasync saves every {EVERY} steps; medians over the run's saves")
  print(f"{'case':28s} {'ckpt MB':>8s} {'step ms':>8s} {'w/ saves':>8s} {'block ms':>8s} "
        f"{'total ms':>8s} {'share':>6s}")
  for name, size, base, with_ckpt, block, total in rows:
    print(f"{name:28s} {size / 2**20:8.1f} {1e3 * base:8.1f} {1e3 * with_ckpt:8.1f} "
          f"{1e3 * block:8.1f} {1e3 * total:8.1f} {block / (EVERY * base):6.1%}")


if __name__ == "__main__":
  main()
