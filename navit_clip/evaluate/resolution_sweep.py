"""One model, many resolutions: zero-shot accuracy and throughput at several patch budgets.

NaViT serves any sequence length; this measures what each buys. Per budget: top-1 / top-5,
the mean tokens actually used per image (small images use fewer than the budget), and
the images/s of the model alone (decoding excluded, the compiling batch excluded). The
report is a Markdown table and a PNG with accuracy against tokens and against images/s.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import numpy as np

from navit_clip import storage
from navit_clip.evaluate import zeroshot
from navit_clip.evaluate.embedder import Embedder, embed_packed


def measure(embedder: Embedder, batches: Iterable[Mapping[str, np.ndarray]],
            classifier: np.ndarray, budget: int) -> dict[str, float | int]:
  """Zero-shot accuracy and throughput over labelled packed `batches` at one budget.

  Args:
    classifier: float32 [K, D] from `zeroshot.class_embeddings`.
  """
  tokens = [0]

  def counted():
    for batch in batches:
      tokens[0] += int((batch["segment_ids"] > 0).sum())
      yield batch

  timing: dict[str, float] = {}
  embedded = embed_packed(embedder, counted(), extra_fields=("labels",), timing=timing)
  acc = zeroshot.accuracy(embedded["embedding"], embedded["labels"], classifier)
  n = len(embedded["example_id"])
  images_per_s = (timing["timed_images"] / timing["model_s"] if timing["model_s"] > 0
                  else float("nan"))
  return {"budget": budget, "top1": acc["top1"], "top5": acc["top5"],
          "tokens_per_image": tokens[0] / n, "images_per_s": images_per_s, "num_images": n}


def table(rows: list[dict]) -> str:
  """The sweep as a Markdown table, one row per budget."""
  lines = ["| budget | tokens/image | top-1 | top-5 | images/s |",
           "|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['budget']} | {r['tokens_per_image']:.1f} | {r['top1']:.2%} | "
                 f"{r['top5']:.2%} | {r['images_per_s']:.1f} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], out, title: str) -> None:
  """Writes a PNG to `out` (a local path or a binary file): top-1 against mean tokens per
  image, and against images/s."""
  import matplotlib  # plotting is loaded only when a report is written
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  tokens = [r["tokens_per_image"] for r in rows]
  top1 = [100 * r["top1"] for r in rows]
  speed = [r["images_per_s"] for r in rows]
  left.plot(tokens, top1, "o-")
  left.set_xscale("log", base=2)
  left.set_xlabel("tokens per image (mean)")
  left.set_ylabel("zero-shot top-1 (%)")
  right.plot(speed, top1, "o-")
  right.set_xscale("log")
  right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  right.set_xlabel("images / s (model only)")
  for r, x, y, s in zip(rows, tokens, top1, speed):
    left.annotate(str(r["budget"]), (x, y), textcoords="offset points", xytext=(4, 4))
    right.annotate(str(r["budget"]), (s, y), textcoords="offset points", xytext=(4, 4))
  for ax in (left, right):
    ax.grid(True, alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=100, format="png")
  plt.close(fig)


def write_report(rows: list[dict], workdir: str, name: str) -> dict[str, str]:
  """Writes `resolutions_<name>.md` and `.png` into `workdir` (local or a URL); returns
  their paths."""
  storage.makedirs(workdir)
  md = storage.join(workdir, f"resolutions_{name}.md")
  png = storage.join(workdir, f"resolutions_{name}.png")
  storage.write_atomic(md, table(rows))
  image = io.BytesIO()
  plot(rows, image, f"{name}: zero-shot accuracy against patch budget")
  storage.write_atomic(png, image.getvalue())
  return {"table": md, "plot": png}
