"""Running the evaluators of `config.evals`, inside training and standalone.

Each entry of `config.evals` (see `navit_clip.evaluate.evaluators`) names a kind:
  zeroshot     top-1 / top-5 / per-class accuracy from class names x templates
  retrieval    image->text and text->image recall@1/5/10
  resolutions  zero-shot at each patch budget of `budgets`: a table and a PNG plot
and runs inside training at multiples of `every_steps` (`run_evals`), or all at once on a
restored model (`run_all`, `navit-clip eval`).

A zero-shot evaluator's labels index the dataset's classes (folder:DIR: its sorted folder
names). Class names given to the evaluator that match the dataset's own (case- and
underscore-insensitively) are put in label order by name; other names are taken by
position, and the pairing of labels and names is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import ml_collections
from flax import nnx

from navit_clip.data.pipeline import decode_limits, make_tokenizer
from navit_clip.errors import UserError
from navit_clip.evaluate import prompts, resolution_sweep, retrieval, zeroshot
from navit_clip.evaluate.datasets import EvalData, load_eval_data
from navit_clip.evaluate.embedder import Embedder, as_embedder
from navit_clip.evaluate.evaluators import EVAL_KINDS
from navit_clip.evaluate.inference_batches import Skipped, inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec

log = logging.getLogger(__name__)
_logged_pairings: set[tuple[str, str]] = set()  # (dataset, classnames) logged by position


def is_due(e: ml_collections.ConfigDict, step: int) -> bool:
  """Whether evaluator `e` runs inside training after `step`."""
  return e.every_steps > 0 and step % e.every_steps == 0


def class_lists(e: ml_collections.ConfigDict,
                data: EvalData) -> tuple[Sequence[str], Sequence[str]]:
  """(class names in label order, templates) of a zero-shot evaluator.

  The class names are the evaluator's own (see `label_order`), else the dataset's.
  """
  if data.label_field is None:
    raise UserError(f"zero-shot dataset {data.name!r} has no labels")
  classnames = data.classnames
  if e.classnames:
    classnames = prompts.load_classnames(e.classnames)
    if data.classnames is not None:
      classnames = label_order(classnames, data.classnames, e.classnames, data.name)
  if classnames is None:
    raise UserError(f"zero-shot dataset {data.name!r} does not name its classes; set the "
                    "evaluator's classnames (e.g. 'imagenet' or a file)")
  if e.templates:
    templates = prompts.load_templates(e.templates)
  else:
    templates = data.templates or prompts.load_templates("clip")
  return classnames, templates


def _name_key(name: str) -> str:
  """A class name as compared with another: case, underscores and spacing ignored."""
  return " ".join(name.replace("_", " ").lower().split())


def label_order(names: Sequence[str], dataset_classes: Sequence[str], spec: str,
                dataset: str) -> list[str]:
  """`names` (class names from `spec`) as label -> name for `dataset`'s classes.

  If every dataset class matches one of `names` (compared by `_name_key`), label k gets the
  name that matches dataset class k, in whatever order `spec` lists them, and names of no
  class are left out (with a warning when the order differs or names are left out).
  Otherwise label k gets names[k], and the pairing is logged, once per process.

  Raises:
    UserError: the names do not all match and their count is not the number of classes.
  """
  keys, class_keys = [_name_key(n) for n in names], [_name_key(c) for c in dataset_classes]
  distinct = len(set(keys)) == len(keys) and len(set(class_keys)) == len(class_keys)
  if distinct and set(class_keys) <= set(keys):
    if keys != class_keys:
      others = len(keys) - len(class_keys)
      log.warning("classnames %r lists the %d classes of %r in another order than its labels%s;"
                  " matched them by name", spec, len(class_keys), dataset,
                  f", and {others} names of no class (left out)" if others else "")
    by_key = dict(zip(keys, names))
    return [by_key[k] for k in class_keys]
  if len(names) != len(dataset_classes):
    raise UserError(f"classnames {spec!r} has {len(names)} names but dataset {dataset!r} has "
                    f"{len(dataset_classes)} classes")
  if (dataset, spec) not in _logged_pairings:
    _logged_pairings.add((dataset, spec))
    _log_positional(names, dataset_classes, spec, dataset)
  return list(names)


def _log_positional(names: Sequence[str], dataset_classes: Sequence[str], spec: str,
                    dataset: str) -> None:
  """Logs label: class -> name; warns about names that are other labels' classes."""
  label_of = {_name_key(c): k for k, c in enumerate(dataset_classes)}
  misplaced = [(k, label_of[_name_key(n)]) for k, n in enumerate(names)
               if label_of.get(_name_key(n), k) != k]
  if misplaced:
    k, other = misplaced[0]
    log.warning("classnames %r: %d names are classes of %r at other labels (e.g. %r is "
                "listed as label %d but is class %d there); names are taken by position",
                spec, len(misplaced), dataset, names[k], k, other)
  log.info("zero-shot %r: the names of %r do not all match its classes; label: class -> "
           "name, by position:\n%s", dataset, spec,
           "\n".join(f"  {k}: {c} -> {n}" for k, (c, n) in enumerate(zip(dataset_classes,
                                                                          names))))


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
                           limits=decode_limits(config), resample=policy.resample,
                           draft=policy.draft, skipped=skipped)


def _skip_report(skipped: list[Skipped], name: str) -> dict:
  if skipped:
    log.warning("eval %s: skipped %d unusable images, e.g. example %d (%s)", name,
                len(skipped), skipped[0].example_id, skipped[0].reason)
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
      raise UserError(f"retrieval dataset {data.name!r} has no captions")
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
    raise UserError(f"config.evals.{name}.kind = {e.kind!r}; expected one of "
                    f"{list(EVAL_KINDS)}")
  out.update(dataset=e.dataset, **_skip_report(skipped, name))
  return out


def run_all(model: nnx.Module | Embedder, config: ml_collections.ConfigDict,
            names: Sequence[str] | None = None, workdir: str | None = None) -> dict[str, dict]:
  """Runs the evaluators `names` of config.evals (all if None): name -> results."""
  names = list(config.evals.keys()) if names is None else list(names)
  unknown = [n for n in names if n not in config.evals]
  if unknown:
    raise UserError(f"unknown evaluators {unknown}; config.evals has "
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
