"""What the `navit-clip` commands run: one `run_<command>(args, overrides)` per command.

`args` is the argparse namespace that navit_clip.cli parsed, `overrides` the
["KEY=VALUE", ...] of the --config.KEY=VALUE items. Input is checked here, where it enters:
the config a command builds is validated, with the ValueErrors of validation raised as
user errors (navit_clip.errors). Results are printed to stdout (JSON where structured).

The modules that load JAX are imported inside the run_* functions, so that parsing the
command line (and --help) stays fast.
"""

from __future__ import annotations

import argparse
import json
import os

import ml_collections

from navit_clip import storage
from navit_clip.errors import UserError, as_user_errors

CLI_EVAL = "cli"  # the name of the evaluator that --zeroshot / --retrieval add
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def _validated(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, checked by navit_clip.config.validate; its complaints are user errors."""
  from navit_clip.config import validate
  with as_user_errors():
    validate(config)
  return config


def run_train(args: argparse.Namespace, overrides: list[str]) -> None:
  """Trains --config (with the overrides) into --workdir, resuming from its checkpoints."""
  from navit_clip.config_loading import apply_overrides, load_config
  from navit_clip.train import train

  config = load_config(args.config)
  apply_overrides(config, overrides)
  train(_validated(config), args.workdir)


def _local_workdir(command: str, workdir: str) -> None:
  """Refuses a URL --workdir for `command`, whose reports and plots are local files."""
  if not storage.is_local(workdir):
    raise UserError(f"--workdir {workdir}: `navit-clip {command}` writes its report and plots "
                    "into a local folder; give a local path (train, import, eval, embed and "
                    "export take URLs)")


def run_demo(args: argparse.Namespace, overrides: list[str]) -> dict[str, dict]:
  """The demo in --workdir (see navit_clip.demo); returns the zero-shot report."""
  from navit_clip import demo

  _local_workdir("demo", args.workdir)
  config = _validated(demo.demo_config(args.workdir, overrides))
  return demo.run_demo(args.workdir, config)


def run_study(args: argparse.Namespace, overrides: list[str]) -> dict:
  """The NaViT study in --workdir (see navit_clip.study), --quick for a couple of minutes;
  returns its report."""
  from navit_clip import study
  from navit_clip.config_loading import apply_overrides, load_config

  _local_workdir("study", args.workdir)
  config = load_config("study:navit")  # the overrides are checked once, before any run
  apply_overrides(config, overrides)
  _validated(config)
  study.use_compilation_cache(os.path.join(os.path.abspath(args.workdir), "jax_cache"))
  return study.run_study(args.workdir, study.QUICK if args.quick else study.FULL, overrides)


def _add_cli_evaluators(config: ml_collections.ConfigDict, args: argparse.Namespace) -> None:
  """The evaluators of --zeroshot / --retrieval, as config.evals.cli_<kind>."""
  from navit_clip.config import eval_config

  for kind, dataset in (("zeroshot", args.zeroshot), ("retrieval", args.retrieval)):
    if dataset:
      config.evals[f"{CLI_EVAL}_{kind}"] = eval_config(
          kind, dataset, classnames=args.classnames if kind == "zeroshot" else "",
          templates=args.templates if kind == "zeroshot" else "",
          resolution=args.resolution or config.inference_resolution,
          max_examples=args.max_examples)


def _add_sweeps(config: ml_collections.ConfigDict, names: list[str], budgets: str) -> list[str]:
  """A resolutions sweep over `budgets` per zero-shot evaluator of `names`; their names."""
  from navit_clip.config import eval_config

  added = []
  for name in names:
    e = config.evals[name]
    if e.kind == "zeroshot":
      sweep = eval_config("resolutions", e.dataset)
      sweep.update({k: v for k, v in e.items() if k not in ("kind", "budgets")})
      sweep.budgets = budgets
      config.evals[f"{name}_resolutions"] = sweep
      added.append(f"{name}_resolutions")
  return added


def _evaluator_names(config: ml_collections.ConfigDict, args: argparse.Namespace) -> list[str]:
  """The evaluators to run: --only's, else all of config.evals; plus the --budgets sweeps."""
  names = [n for n in args.only.split(",") if n] or list(config.evals.keys())
  unknown = [n for n in names if n not in config.evals]
  if unknown:
    raise UserError(f"--only {args.only!r}: unknown evaluators {unknown}; config.evals of "
                    f"{args.workdir!r} has {list(config.evals.keys())}")
  if not names:
    raise UserError(f"no evaluators: {args.workdir}/config.json has no config.evals; add one "
                    "with --zeroshot DATASET or --retrieval DATASET")
  return names + (_add_sweeps(config, names, args.budgets) if args.budgets else [])


def run_eval(args: argparse.Namespace, overrides: list[str]) -> dict:
  """Evaluates the restored model; prints and writes workdir/eval_step<N>.json."""
  from navit_clip.config_loading import apply_overrides
  from navit_clip.evaluate.restore import restore_model
  from navit_clip.evaluate.runner import run_all

  restored = restore_model(args.workdir, args.step)
  config = restored.config
  apply_overrides(config, overrides)
  _add_cli_evaluators(config, args)
  names = _evaluator_names(config, args)
  _validated(config)
  results = run_all(restored.model, config, names, workdir=restored.workdir)
  report = {"workdir": restored.workdir, "step": restored.step, "evals": results}
  storage.write_atomic(storage.join(restored.workdir, f"eval_step{restored.step}.json"),
                       json.dumps(report, indent=2))
  print(json.dumps(report, indent=2))
  return report


def _image_source(spec: str, config: ml_collections.ConfigDict):
  """A dataset string (kind:arg, or "demo") or image files."""
  from navit_clip.evaluate.datasets import KINDS, load_eval_data
  from navit_clip.evaluate.files import ImageFiles, list_images

  kind, sep, _ = spec.partition(":")
  if spec == "demo" or (sep and kind in KINDS):
    return load_eval_data(spec, config).source
  return ImageFiles(list_images(spec))


def _policy(args: argparse.Namespace, config: ml_collections.ConfigDict):
  """The inference resolution policy: --resolution, else config.inference_resolution."""
  from navit_clip.evaluate.inference_resolution import ResolutionPolicy

  with as_user_errors("--resolution" if args.resolution else "config.inference_resolution"):
    return ResolutionPolicy.parse(args.resolution or config.inference_resolution)


def run_embed(args: argparse.Namespace, overrides: list[str]) -> dict:
  """Writes image or text embeddings of the restored model (see navit_clip.embedding_writer)."""
  from navit_clip import embedding_writer
  from navit_clip.data.pipeline import make_tokenizer
  from navit_clip.evaluate.embedder import Embedder
  from navit_clip.evaluate.restore import restore_model

  restored = restore_model(args.workdir, args.step)
  embedder = Embedder(restored.model)
  if args.texts:
    if not hasattr(restored.model, "embed_texts"):
      raise UserError(f"--texts needs a contrastive model; {args.workdir!r} trained a "
                      f"{restored.config.task} model")
    summary = embedding_writer.export_text_embeddings(
        embedder, make_tokenizer(restored.config), embedding_writer.read_texts(args.texts),
        args.out, dtype=args.dtype, chunk=args.chunk, progress=not args.no_progress)
  else:
    summary = embedding_writer.export_image_embeddings(
        embedder, restored.config, _image_source(args.images, restored.config), args.out,
        policy=_policy(args, restored.config), dtype=args.dtype, chunk=args.chunk,
        batch_size=args.batch_size, seq_len=args.seq_len, max_images=args.max_images,
        num_workers=args.workers, progress=not args.no_progress)
  print(json.dumps(summary, indent=2))
  return summary


def run_export(args: argparse.Namespace, overrides: list[str]) -> dict:
  """Exports the restored model's encoders to --out (see navit_clip.serving_export)."""
  from navit_clip.data.pipeline import make_tokenizer
  from navit_clip.evaluate.inference_resolution import inference_spec
  from navit_clip.evaluate.restore import restore_model
  from navit_clip.serving_export import export_model, prepare_out_dir

  platforms = tuple(p for p in args.platforms.split(",") if p)
  unknown = sorted(set(platforms) - set(EXPORT_PLATFORMS))
  if unknown or not platforms:
    raise UserError(f"--platforms {args.platforms!r}: expected some of "
                    f"{list(EXPORT_PLATFORMS)}")
  prepare_out_dir(args.out, args.overwrite)  # refuse before the restore, not after
  restored = restore_model(args.workdir, args.step)
  policy = _policy(args, restored.config)
  spec = inference_spec(restored.config, policy, batch_size=args.batch_size,
                        seq_len=args.seq_len, max_images=args.max_images)
  tokenizer = (make_tokenizer(restored.config) if restored.config.data.tokenizer.path
               else None)
  manifest = export_model(restored.model, spec, restored.config.model.text.max_len, args.out,
                          tf=args.tf, text_batch=args.text_batch, overwrite=args.overwrite,
                          tokenizer=tokenizer, resolution=str(policy), platforms=platforms)
  print(json.dumps(manifest, indent=2))
  return manifest


def run_import(args: argparse.Namespace, overrides: list[str]) -> dict:
  """Imports the public checkpoint --from into the new workdir --workdir; prints a summary."""
  from navit_clip.checkpoint_import import import_checkpoint

  config = import_checkpoint(args.source, args.workdir, tokenizer=args.tokenizer or None)
  summary = {"workdir": storage.absolute(args.workdir),
             "image": config.model.image.variant, "text": config.model.text.variant,
             "inference_resolution": config.inference_resolution,
             "tokenizer": config.data.tokenizer.path}
  print(json.dumps(summary, indent=2))
  return summary


def run_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> None:
  """Trains a SentencePiece model on --input, one caption per line, into --out."""
  from navit_clip.text.tokenizer import train_from_file

  train_from_file(args.input, args.vocab_size, args.out, lowercase=args.lowercase)
  print(f"wrote {args.out}")


def _data_config(args: argparse.Namespace, overrides: list[str]) -> ml_collections.ConfigDict:
  """The default config reading --source / --files, with the --config.data.* overrides."""
  from navit_clip.config import default_config
  from navit_clip.config_loading import apply_overrides

  config = default_config()
  config.data.source = args.source
  config.data.train_files = args.files
  apply_overrides(config, overrides)
  return _validated(config)


def run_data_convert(args: argparse.Namespace, overrides: list[str]) -> dict:
  """Converts a source to ArrayRecord shards in --out; prints and returns the counts."""
  from navit_clip.data.convert import convert

  counts = convert(_data_config(args, overrides), args.out, workers=args.workers,
                   records_per_shard=args.records_per_shard, prefix=args.prefix)
  skipped = {k: v for k, v in counts.items() if k.startswith("skipped/")}
  print(f"wrote {counts.get('written', 0)} of {counts.get('records', 0)} records to "
        f"{args.out}; skipped: {skipped or 'none'}")
  return counts


def run_data_inspect(args: argparse.Namespace, overrides: list[str]) -> None:
  """Prints (and with --json writes) the report of navit_clip.data.inspect on a source."""
  from navit_clip.data.inspect import inspect_source

  report = inspect_source(_data_config(args, overrides), limit=args.limit,
                          workers=args.workers)
  print(report.format())
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report.to_dict(), f, indent=2)
