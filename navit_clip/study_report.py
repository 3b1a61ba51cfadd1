"""The tables and plots of `navit-clip study` (navit_clip.study): study.md, PNGs, results.json.

Accuracies are means over seeds (± the standard deviation when there are several); token
counts are what the trainer counted (`tokens_seen`: real, non-padding patch tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from navit_clip.configs.study import MAX_SIDE, MIN_SIDE
from navit_clip.data.sources import study_shapes
from navit_clip.evaluate import resolution_sweep

LABELS = {"navit": "NaViT", "vit": "ViT (square)", "navit_absolute": "factorized absolute",
          "navit_learned_2d": "learned 2-D table", "drop_constant": "constant 0.5",
          "drop_beta": "Beta, mean 0.5", "drop_resolution": "resolution 0.1-0.7"}
POSEMB_LABELS = {"navit": "factorized fractional"}
METRICS = (("top1", "top-1 (6 shapes)"), ("proportion", "proportion (3)"), ("kind", "kind (2)"))
CHANCE = {"top1": 1 / 6, "proportion": 1 / 3, "kind": 1 / 2}
DROPS = ("navit", "drop_constant", "drop_beta", "drop_resolution")


def _runs(results: dict, variant: str, by_images: bool = False) -> list:
  return [r for r in results.values() if r.variant == variant and r.by_images == by_images]


def _mean_sd(values: Sequence[float], percent: bool = True) -> str:
  scale = 100 if percent else 1
  mean = scale * float(np.mean(values))
  text = f"{mean:.1f}%" if percent else f"{mean:,.0f}"
  if len(values) > 1:
    sd = scale * float(np.std(values, ddof=1))
    text += f" ± {sd:.1f}" if percent else f" ± {sd:,.0f}"
  return text


def mean_curve(runs: list, metric: str = "top1") -> tuple[np.ndarray, np.ndarray]:
  """(tokens, accuracy) at each checkpoint, averaged over the runs (seeds)."""
  tokens = np.mean([[p["tokens_seen"] for p in r.curve] for r in runs], axis=0)
  return tokens, np.mean([[p[metric] for p in r.curve] for r in runs], axis=0)


def tokens_to_reach(tokens: np.ndarray, accuracy: np.ndarray, target: float) -> float:
  """The tokens at which a curve first reaches `target`, interpolated linearly between
  checkpoints (the first checkpoint's tokens if it is there already). A curve's last
  point is at least the lowest final accuracy compared, so the target is always reached."""
  for i, acc in enumerate(accuracy):
    if acc >= target:
      if i == 0:
        return float(tokens[0])
      frac = (target - accuracy[i - 1]) / (acc - accuracy[i - 1])
      return float(tokens[i - 1] + frac * (tokens[i] - tokens[i - 1]))
  raise ValueError(f"the curve never reaches {target}; its best is {max(accuracy)}")


def navit_vit_table(results: dict) -> str:
  """Study 1: NaViT against the ViT at equal compute, and the tokens each needs."""
  lines = ["| model | seeds | steps | real tokens | images seen | "
           + " | ".join(m for _, m in METRICS) + " | wall s |",
           "|---|---|---:|---:|---:|" + "---:|" * len(METRICS) + "---:|"]
  for variant in ("navit", "vit"):
    runs = _runs(results, variant)
    cells = [LABELS[variant], ",".join(str(r.seed) for r in runs),
             _mean_sd([r.steps for r in runs], False),
             _mean_sd([r.tokens_seen for r in runs], False),
             _mean_sd([r.images_seen for r in runs], False)]
    cells += [_mean_sd([r.final[k] for r in runs]) for k, _ in METRICS]
    cells.append(f"{np.mean([r.train_s for r in runs]):.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n\n" + _reach_lines(results) + "\n"


def _reach_lines(results: dict) -> str:
  """For each metric: the tokens NaViT and the ViT need to reach the lower final mean.

  A curve that is there at its first evaluation gives only a bound ("<= N tokens").
  """
  out = []
  for metric, name in METRICS:
    curves = {v: mean_curve(_runs(results, v), metric) for v in ("navit", "vit")}
    target = min(float(acc[-1]) for _, acc in curves.values())
    need = {v: tokens_to_reach(t, a, target) for v, (t, a) in curves.items()}
    bound = {v: bool(a[0] >= target) for v, (_, a) in curves.items()}
    text = ", ".join(f"{LABELS[v]} {'<= ' if bound[v] else ''}{need[v]:,.0f}"
                     for v in need)
    ratio = ""
    if not bound["vit"]:
      ratio = (f" (ViT / NaViT = {'>= ' if bound['navit'] else ''}"
               f"{need['vit'] / need['navit']:.2f}x)")
    out.append(f"- tokens to reach {100 * target:.1f}% {name}: {text}{ratio}")
  return "\n".join(out)


def posemb_table(results: dict, plan) -> str:
  """Study 2: top-1 at fixed sides, per position embedding; * marks the training range."""
  sides = [f"{s}{'*' if MIN_SIDE <= s <= MAX_SIDE else ''}" for s in plan.sides]
  lines = ["| position embedding | seeds | " + " | ".join(f"side {s}" for s in sides) + " |",
           "|---|---|" + "---:|" * len(sides)]
  for variant in ("navit", "navit_absolute", "navit_learned_2d"):
    runs = [r for r in _runs(results, variant) if r.at_sides]
    cells = [POSEMB_LABELS.get(variant, LABELS[variant]), ",".join(str(r.seed) for r in runs)]
    cells += [_mean_sd([r.at_sides[f"side:{s}"]["top1"] for r in runs]) for s in plan.sides]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def drop_table(results: dict) -> str:
  """Study 3: token dropping against none, at equal compute and at equal images."""
  lines = ["| token drop | seeds | equal compute: real tokens | images seen | top-1 | "
           "equal images: real tokens | images seen | top-1 |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  seeds = sorted({r.seed for r in _runs(results, "drop_constant")})
  for variant in DROPS:
    compute = [r for r in _runs(results, variant) if r.seed in seeds]
    images = compute if variant == "navit" else _runs(results, variant, by_images=True)
    cells = ["none" if variant == "navit" else LABELS[variant],
             ",".join(str(r.seed) for r in compute)]
    for runs in (compute, images):
      cells += [_mean_sd([r.tokens_seen for r in runs], False),
                _mean_sd([r.images_seen for r in runs], False),
                _mean_sd([r.final["top1"] for r in runs])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def runs_table(results: dict) -> str:
  """Every run: its steps, the tokens and images it trained on, its time and final top-1."""
  lines = ["| run | steps | real tokens | images seen | wall s | top-1 |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in results.values():
    lines.append(f"| {r.name} | {r.steps} | {r.tokens_seen:,.0f} | {r.images_seen:,.0f} | "
                 f"{r.train_s:.0f} | {100 * r.final['top1']:.1f}% |")
  return "\n".join(lines) + "\n"


def equal_compute_line(results: dict) -> str:
  """The spread of the real tokens that the equal-compute runs trained on."""
  tokens = [r.tokens_seen for r in results.values() if not r.by_images]
  lo, hi = min(tokens), max(tokens)
  return (f"Real patch tokens of the {len(tokens)} equal-compute runs: {lo:,.0f} to "
          f"{hi:,.0f} (spread {100 * (hi - lo) / hi:.2f}%).")


def _pyplot():
  import matplotlib  # plotting is loaded only when a report is written
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_curves(results: dict, variants: Sequence[str], path: str, title: str) -> None:
  """Accuracy against real tokens seen, one panel per metric: seeds thin, means thick."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.8))
  for ax, (metric, name) in zip(axes, METRICS):
    for i, variant in enumerate(variants):
      runs, color = _runs(results, variant), f"C{i}"
      for r in runs:
        ax.plot([p["tokens_seen"] for p in r.curve], [100 * p[metric] for p in r.curve],
                color=color, alpha=0.3, lw=0.8)
      tokens, acc = mean_curve(runs, metric)
      ax.plot(tokens, 100 * acc, "o-", color=color, label=LABELS[variant])
    ax.axhline(100 * CHANCE[metric], color="0.5", ls=":", label="chance")
    if metric == "proportion" and "vit" in variants:
      ax.axhline(100 * study_shapes.SQUASHED_BEST_PROPORTION, color="C1", ls="--",
                 label="best after a squash")
    ax.set_xlabel("real patch tokens seen")
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
    ax.set_ylabel(f"zero-shot {name} (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
  for ax in axes:
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_posemb(results: dict, plan, path: str) -> None:
  """Top-1 against the evaluation side per position embedding; the training range shaded."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.axvspan(MIN_SIDE, MAX_SIDE, color="0.9", label="training sides")
  for variant in ("navit", "navit_absolute", "navit_learned_2d"):
    runs = [r for r in _runs(results, variant) if r.at_sides]
    acc = [100 * np.mean([r.at_sides[f"side:{s}"]["top1"] for r in runs]) for s in plan.sides]
    ax.plot(plan.sides, acc, "o-", label=POSEMB_LABELS.get(variant, LABELS[variant]))
  ax.axhline(100 * CHANCE["top1"], color="0.5", ls=":", label="chance")
  ax.set_xlabel("evaluation side (px; area side x side, aspect kept)")
  ax.set_ylabel("zero-shot top-1 (%)")
  ax.set_ylim(0, 100)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write(workdir: str, plan, results: dict, sweep: list[dict], wall_s: float) -> dict:
  """Writes study.md, results.json and the PNGs into `workdir`; returns {"summary": the
  Markdown, "files": [paths]}."""
  files = {name: os.path.join(workdir, f"{name}.png")
           for name in ("navit_vs_vit", "posemb", "token_drop", "resolution_sweep")}
  plot_curves(results, ("navit", "vit"), files["navit_vs_vit"],
              "NaViT against the ViT baseline at equal compute")
  plot_posemb(results, plan, files["posemb"])
  plot_curves(results, DROPS, files["token_drop"], "token dropping at equal compute")
  resolution_sweep.plot(sweep, files["resolution_sweep"],
                        "one NaViT model: zero-shot top-1 against patch budget")
  md = "\n".join([
      "## 1. NaViT against the ViT baseline (equal compute)", "", navit_vit_table(results),
      "![](navit_vs_vit.png)", "",
      "## 2. Position embeddings at sides inside (*) and outside the training range", "",
      posemb_table(results, plan), "![](posemb.png)", "",
      "## 3. Token dropping", "", drop_table(results), "![](token_drop.png)", "",
      "## 4. One NaViT model at many resolutions", "", resolution_sweep.table(sweep),
      "![](resolution_sweep.png)", "", "## Every run", "", runs_table(results),
      equal_compute_line(results), f"Study wall time: {wall_s / 60:.1f} min.", ""])
  study_md = os.path.join(workdir, "study.md")
  with open(study_md, "w", encoding="utf-8") as f:
    f.write(md)
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"plan": dataclasses.asdict(plan), "wall_s": wall_s, "sweep": sweep,
               "runs": {k: dataclasses.asdict(r) for k, r in results.items()}}, f, indent=1)
  return {"summary": md, "files": [study_md, *files.values()]}
