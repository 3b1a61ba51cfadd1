"""Train-step MFU and data-wait share for the demo config and for S/16 at L=256.

MFU = XLA-counted FLOPs of the compiled step / step time / a float32 matmul peak measured
in the same run (on this CPU the matmul rate is the honest ceiling). The data-wait share is
the fraction of wall time the loop spends in next(iterator) for the host pipeline
(in-process Grain, demo source). Run: .venv/bin/python bench/train_step.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from navit_clip.config_loading import apply_overrides, load_config
from navit_clip.data.sources.demo import caption_corpus
from navit_clip.flops import measure_matmul_peak
from navit_clip.text.tokenizer import train_tokenizer
from navit_clip.train import train

CASES = {
    "demo (nano/8, B=16, L=128)": ("demo", []),
    "S/16, B=8, L=256, text S": ("demo", [
        "model.image.variant=S/16", "model.text.variant=S", "data.batch_size=8",
        "data.seq_len=256", "data.max_images=8", "data.resolution.min_side=64",
        "data.resolution.max_side=256", "model.image.posemb_resolution=64"]),
}


def run_case(name: str, overrides: list[str], tokenizer: str, steps: int, peak: float,
             root: str) -> dict:
  config = load_config("demo")
  apply_overrides(config, overrides + [
      f"train.total_steps={steps}", f"train.log_every={steps // 2}", "optim.warmup_steps=1",
      "train.tensorboard=false", f"train.peak_flops={peak}"])
  config.data.tokenizer.path = tokenizer
  workdir = os.path.join(root, name.split()[0].replace("/", "_"))
  train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return json.loads(f.read().splitlines()[-1])  # second half: warm pipeline and caches


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps")
  args = parser.parse_args()
  steps = 6 if args.quick else 20
  with tempfile.TemporaryDirectory() as root:
    tokenizer = os.path.join(root, "tok.model")
    train_tokenizer(caption_corpus(4000), 64, tokenizer, lowercase=True)
    peak = measure_matmul_peak()
    print(f"float32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s")
    rows = [(name, run_case(name, o, tokenizer, steps, peak, root))
            for name, (_, o) in CASES.items()]
  print(f"\n{'case':30s} {'step ms':>8s} {'MFU':>6s} {'data wait':>9s} {'images/s':>9s}")
  for name, r in rows:
    print(f"{name:30s} {1e3 * r['step_time']:8.1f} {r['mfu']:6.1%} {r['data_wait_frac']:9.1%} "
          f"{r['images_per_s']:9.1f}")


if __name__ == "__main__":
  main()
