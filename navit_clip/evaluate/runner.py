"""Running the evaluators of `config.evals`, inside training and standalone.

Each entry of `config.evals` (see `navit_clip.evaluate.evaluators`) names a kind:
  zeroshot        top-1 / top-5 / per-class accuracy from class names x templates
  retrieval       image->text and text->image recall@1/5/10
  resolutions     zero-shot at each patch budget of `budgets`: a table and a PNG plot
  fewshot         linear-probe top-1 on frozen image embeddings, per number of shots,
                  over seeds (contrastive and classification models)
  classification  a classification model's top-1 / top-5 (softmax) or prec@1 / mAP
                  (sigmoid, multi-hot labels) on a labelled set
and runs inside training at multiples of `every_steps` (`run_evals`), or all at once on a
restored model (`run_all`, `navit-clip eval`). The first three embed texts: they need a
contrastive model.

A zero-shot evaluator's labels index the dataset's classes (folder:DIR: its sorted folder
names). Class names given to the evaluator that match the dataset's own (case- and
underscore-insensitively) are put in label order by name; other names are taken by
position, and the pairing of labels and names is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence

import grain
import ml_collections
from flax import nnx

from navit_clip.data.pipeline import decode_limits, make_tokenizer
from navit_clip.data.progress import Progress
from navit_clip.errors import UserError
from navit_clip.evaluate import (classification, fewshot, prompts, resolution_sweep, retrieval,
                                 zeroshot)
from navit_clip.evaluate.datasets import EvalData, load_eval_data
from navit_clip.evaluate.embedder import Embedder, as_embedder, embed_packed
from navit_clip.evaluate.evaluators import CONTRASTIVE_KINDS, EVAL_KINDS, parse_ints
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
                     skipped: list[Skipped], multi_label: bool = False):
  """Packed batches of `data` under `policy` with the evaluator's batch shape; with
  `num_classes`, "labels" from its label field (multi-hot [B, M, K] if `multi_label`).
  The records read, rate and ETA are logged every few seconds (navit_clip.data.progress)."""
  spec = inference_spec(config, policy, batch_size=e.batch_size, seq_len=e.seq_len,
                        max_images=e.max_images, num_classes=num_classes)
  spec = dataclasses.replace(spec, multi_label=multi_label)
  sampler = policy.sampler(spec.patch_size, spec.seq_len, config.data.resolution.max_upscale)
  bar = Progress(f"eval {data.name} at {policy}", _records_total(data.source, e.max_examples))
  batches = inference_batches(data.source, spec, sampler,
                              label_field=data.label_field if num_classes else None,
                              stop=e.max_examples or None, num_workers=e.num_workers,
                              limits=decode_limits(config), resample=policy.resample,
                              draft=policy.draft, skipped=skipped,
                              on_records=lambda n: bar.update(n, skipped=len(skipped)))
  return _closing(batches, bar, skipped)


def _records_total(source, max_examples: int) -> int | None:
  """The records an evaluation pass reads: None for a stream read to its end."""
  if isinstance(source, grain.IterDataset):
    return max_examples or None
  return min(len(source), max_examples) if max_examples else len(source)


def _closing(batches: Iterator[dict], bar: Progress, skipped: list[Skipped]) -> Iterator[dict]:
  """`batches`, then the progress's final line."""
  yield from batches
  bar.update(bar.done, skipped=len(skipped))
  bar.close()


def _skip_report(skipped: list[Skipped], name: str) -> dict:
  if skipped:
    log.warning("eval %s: skipped %d unusable images, e.g. example %d (%s)", name,
                len(skipped), skipped[0].example_id, skipped[0].reason)
  reasons: dict[str, int] = {}
  for s in skipped:
    reasons[s.reason] = reasons.get(s.reason, 0) + 1
  return {"skipped": len(skipped), "skipped_reasons": reasons}


def _zeroshot(e, embedder, config, data, skipped, workdir, name) -> dict:
  classnames, templates = class_lists(e, data)
  policy = ResolutionPolicy.parse(e.resolution)
  batches = labelled_batches(config, e, data, policy, len(classnames), skipped)
  out = zeroshot.evaluate(embedder, make_tokenizer(config), batches, classnames, templates)
  return dict(out, resolution=str(policy))


def _retrieval(e, embedder, config, data, skipped, workdir, name) -> dict:
  if data.captions is None:
    raise UserError(f"retrieval dataset {data.name!r} has no captions")
  policy = ResolutionPolicy.parse(e.resolution)
  batches = labelled_batches(config, e, data, policy, None, skipped)
  out = retrieval.evaluate(embedder, make_tokenizer(config), batches, data.captions)
  return dict(out, resolution=str(policy))


def _resolutions(e, embedder, config, data, skipped, workdir, name) -> dict:
  classnames, templates = class_lists(e, data)
  classifier = zeroshot.class_embeddings(embedder, make_tokenizer(config), classnames,
                                         templates)
  rows = []
  for budget in (int(b) for b in e.budgets.split(",")):
    policy = ResolutionPolicy("budget", budget)
    batches = labelled_batches(config, e, data, policy, len(classnames), skipped)
    rows.append(resolution_sweep.measure(embedder, batches, classifier, budget))
  out = {"rows": rows}
  if workdir is not None:
    out["files"] = resolution_sweep.write_report(rows, workdir, name)
  return out


def _labelled(data: EvalData, kind: str) -> EvalData:
  if data.label_field is None:
    raise UserError(f"{kind} dataset {data.name!r} has no labels")
  return data


def _fewshot_classes(e: ml_collections.ConfigDict, data: EvalData) -> int:
  """K of a few-shot evaluator: e.num_classes, else the number of classes `data` names."""
  if e.num_classes:
    return e.num_classes
  if data.classnames is None:
    raise UserError(f"few-shot dataset {data.name!r} does not name its classes; set the "
                    "evaluator's num_classes")
  return len(data.classnames)


def _fewshot(e, embedder, config, data, skipped, workdir, name) -> dict:
  """Probes on shots from e.train_dataset (else every other image of `data`), scored on
  `data` (else on the other images)."""
  num_classes = _fewshot_classes(e, _labelled(data, "few-shot"))
  policy = ResolutionPolicy.parse(e.resolution)

  def embedded(source: EvalData) -> dict:
    batches = labelled_batches(config, e, _labelled(source, "few-shot"), policy, num_classes,
                               skipped)
    return embed_packed(embedder, batches, extra_fields=("labels",))

  if e.train_dataset:
    pool, test = embedded(_load(e.train_dataset, e, config)), embedded(data)
  else:
    pool, test = fewshot.alternate_split(embedded(data))
  out = fewshot.fewshot_accuracy(pool["embedding"], pool["labels"], test["embedding"],
                                 test["labels"], num_classes=num_classes,
                                 shots=parse_ints(e.shots), seeds=parse_ints(e.seeds))
  return dict(out, resolution=str(policy), pool_images=len(pool["labels"]),
              num_images=len(test["labels"]))


def _classification(e, model, config, data, skipped, workdir, name) -> dict:
  """The classification model's own metrics on `data`, whose labels are its classes."""
  if not isinstance(model, nnx.Module):
    raise UserError(f"evaluator {name!r} (classification) needs the model itself, not an "
                    "Embedder")
  k = config.model.num_classes
  if data.classnames is not None and len(data.classnames) != k:
    raise UserError(f"classification dataset {data.name!r} has {len(data.classnames)} "
                    f"classes but the model has config.model.num_classes = {k}")
  multi_label = config.loss.name == "sigmoid_xent"
  policy = ResolutionPolicy.parse(e.resolution)
  batches = labelled_batches(config, e, _labelled(data, "classification"), policy, k,
                             skipped, multi_label=multi_label)
  return dict(classification.evaluate(model, batches, multi_label), resolution=str(policy))


_RUNS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "resolutions": _resolutions,
         "fewshot": _fewshot, "classification": _classification}


def _load(spec: str, e: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
  return load_eval_data(spec, config, split=e.split, images_dir=e.images_dir,
                        data_dir=e.data_dir)


def _check_task(name: str, e: ml_collections.ConfigDict,
                config: ml_collections.ConfigDict) -> None:
  """Raises UserError when evaluator `name`'s kind does not apply to config.task's model."""
  if e.kind not in _RUNS:
    raise UserError(f"config.evals.{name}.kind = {e.kind!r}; expected one of "
                    f"{list(EVAL_KINDS)}")
  if e.kind in CONTRASTIVE_KINDS and config.task != "contrastive":
    raise UserError(f"config.evals.{name}: {e.kind} embeds texts and needs a contrastive "
                    f"model, not a {config.task} model (fewshot and classification apply)")
  if e.kind == "classification" and config.task != "classification":
    raise UserError(f"config.evals.{name}: classification needs a classification model, "
                    f"not a {config.task} model (zeroshot and fewshot apply)")


def run_evaluator(name: str, e: ml_collections.ConfigDict, model: nnx.Module | Embedder,
                  config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Runs one evaluator on `model` (an Embedder serves every kind but classification);
  returns its JSON-ready results."""
  _check_task(name, e, config)
  data = _load(e.dataset, e, config)
  skipped: list[Skipped] = []
  target = model if e.kind == "classification" else as_embedder(model)
  out = _RUNS[e.kind](e, target, config, data, skipped, workdir, name)
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
  embedder = as_embedder(model)  # one, compiled once, for every evaluator that embeds
  return {n: run_evaluator(n, config.evals[n],
                           model if config.evals[n].kind == "classification" else embedder,
                           config, workdir) for n in names}


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
