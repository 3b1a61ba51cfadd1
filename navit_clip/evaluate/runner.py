"""Running the evaluators of `config.evals`, inside training and standalone.

Each entry of `config.evals` (see `navit_clip.config.eval_config`) names a kind:
  zeroshot     top-1 / top-5 / per-class accuracy from class names x templates
  retrieval    image->text and text->image recall@1/5/10
  resolutions  zero-shot at each patch budget of `budgets`: a table and a PNG plot
and runs inside training at multiples of `every_steps` (`run_evals`), or all at once on a
restored model (`run_all`, `navit-clip eval`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import ml_collections
from flax import nnx

from navit_clip.data.pipeline import decode_limits, make_tokenizer
from navit_clip.evaluate import prompts, resolution_sweep, retrieval, zeroshot
from navit_clip.evaluate.datasets import EvalData, load_eval_data
from navit_clip.evaluate.embedder import Embedder, as_embedder
from navit_clip.evaluate.inference_batches import Skipped, inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec


def is_due(e: ml_collections.ConfigDict, step: int) -> bool:
  """Whether evaluator `e` runs inside training after `step`."""
  return e.every_steps > 0 and step % e.every_steps == 0


def class_lists(e: ml_collections.ConfigDict,
                data: EvalData) -> tuple[Sequence[str], Sequence[str]]:
  """(class names, templates) of a zero-shot evaluator: its own, else the dataset's."""
  if data.label_field is None:
    raise ValueError(f"zero-shot dataset {data.name!r} has no labels")
  classnames = prompts.load_classnames(e.classnames) if e.classnames else data.classnames
  if classnames is None:
    raise ValueError(f"zero-shot dataset {data.name!r} does not name its classes; set the "
                     "evaluator's classnames (e.g. 'imagenet' or a file)")
  if data.classnames is not None and len(classnames) != len(data.classnames):
    raise ValueError(f"classnames {e.classnames!r} has {len(classnames)} names but dataset "
                     f"{data.name!r} has {len(data.classnames)} classes")
  if e.templates:
    templates = prompts.load_templates(e.templates)
  else:
    templates = data.templates or prompts.load_templates("clip")
  return classnames, templates


def labelled_batches(config: ml_collections.ConfigDict, e: ml_collections.ConfigDict,
                     data: EvalData, policy: ResolutionPolicy, num_classes: int | None,
                     skipped: list[Skipped]):
  """Packed batches of `data` under `policy` with the evaluator's batch shape."""
  spec = inference_spec(config, policy, batch_size=e.batch_size, seq_len=e.seq_len,
                        max_images=e.max_images, num_classes=num_classes)
  sampler = policy.sampler(spec.patch_size, spec.seq_len, config.data.resolution.max_upscale)
  return inference_batches(data.source, spec, sampler,
                           label_field=data.label_field if num_classes else None,
                           stop=e.max_examples or None, num_workers=e.num_workers,
                           limits=decode_limits(config), skipped=skipped)


def _skip_report(skipped: list[Skipped], name: str) -> dict:
  if skipped:
    print(f"eval {name}: skipped {len(skipped)} unusable images, e.g. example "
          f"{skipped[0].example_id} ({skipped[0].reason})", file=sys.stderr, flush=True)
  reasons: dict[str, int] = {}
  for s in skipped:
    reasons[s.reason] = reasons.get(s.reason, 0) + 1
  return {"skipped": len(skipped), "skipped_reasons": reasons}


def run_evaluator(name: str, e: ml_collections.ConfigDict, embedder: Embedder,
                  config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Runs one evaluator; returns its JSON-ready results."""
  data = load_eval_data(e.dataset, config, split=e.split, images_dir=e.images_dir,
                        data_dir=e.data_dir)
  tokenizer = make_tokenizer(config)
  skipped: list[Skipped] = []
  if e.kind == "zeroshot":
    classnames, templates = class_lists(e, data)
    policy = ResolutionPolicy.parse(e.resolution)
    batches = labelled_batches(config, e, data, policy, len(classnames), skipped)
    out = zeroshot.evaluate(embedder, tokenizer, batches, classnames, templates)
    out["resolution"] = str(policy)
  elif e.kind == "retrieval":
    if data.captions is None:
      raise ValueError(f"retrieval dataset {data.name!r} has no captions")
    policy = ResolutionPolicy.parse(e.resolution)
    batches = labelled_batches(config, e, data, policy, None, skipped)
    out = retrieval.evaluate(embedder, tokenizer, batches, data.captions)
    out["resolution"] = str(policy)
  elif e.kind == "resolutions":
    classnames, templates = class_lists(e, data)
    classifier = zeroshot.class_embeddings(embedder, tokenizer, classnames, templates)
    budgets = [int(b) for b in e.budgets.split(",")]
    rows = []
    for budget in budgets:
      policy = ResolutionPolicy("budget", budget)
      batches = labelled_batches(config, e, data, policy, len(classnames), skipped)
      rows.append(resolution_sweep.measure(embedder, batches, classifier, budget))
    out = {"rows": rows}
    if workdir is not None:
      out["files"] = resolution_sweep.write_report(rows, workdir, name)
  else:
    raise ValueError(f"config.evals.{name}.kind = {e.kind!r}; expected zeroshot, retrieval "
                     "or resolutions")
  out.update(dataset=e.dataset, **_skip_report(skipped, name))
  return out


def run_all(model: nnx.Module | Embedder, config: ml_collections.ConfigDict,
            names: Sequence[str] | None = None, workdir: str | None = None) -> dict[str, dict]:
  """Runs the evaluators `names` of config.evals (all if None): name -> results."""
  names = list(config.evals.keys()) if names is None else list(names)
  unknown = [n for n in names if n not in config.evals]
  if unknown:
    raise ValueError(f"unknown evaluators {unknown}; config.evals has "
                     f"{list(config.evals.keys())}")
  embedder = as_embedder(model)
  return {n: run_evaluator(n, config.evals[n], embedder, config, workdir) for n in names}


def run_evals(model: nnx.Module, config: ml_collections.ConfigDict, step: int,
              workdir: str | None = None) -> dict[str, dict]:
  """The evaluators due after training step `step` (see `is_due`); {} when none is."""
  names = [n for n, e in config.evals.items() if is_due(e, step)]
  return run_all(model, config, names, workdir) if names else {}


def scalar_metrics(results: dict[str, dict]) -> dict[str, float]:
  """The finite scalar results as {"<evaluator>/<metric>": float}, for the metrics logger.

  A resolutions sweep contributes "<evaluator>/top1@<budget>" per budget.
  """
  out = {}
  for name, result in results.items():
    for key, value in result.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
          out[f"{name}/{key}"] = float(value)
    for row in result.get("rows", ()):
      out[f"{name}/top1@{row['budget']}"] = row["top1"]
  return out
