"""The inference commands of the CLI on a trained workdir: eval, embed and export.

  navit-clip eval   --workdir DIR [--step N] [--only A,B] [--zeroshot DATASET | --retrieval
                    DATASET] [--budgets 64,128,...] [--config.evals.NAME.KEY=VALUE ...]
  navit-clip embed  --workdir DIR (--images PATH|GLOB|DATASET | --texts FILE) --out OUT
  navit-clip export --workdir DIR --out DIR [--tf]
"""

from __future__ import annotations

import argparse
import json
import os

# The argument builders are needed to parse the command line, so the modules that load
# JAX are imported inside the run_* functions.

CLI_EVAL = "cli"  # the name of the evaluator that --zeroshot / --retrieval add


def add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="a training workdir (config.json, checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def add_shape_args(p: argparse.ArgumentParser, resolution: str = "budget:256") -> None:
  p.add_argument("--resolution", default=resolution,
                 help="budget:N | side:S | native (default: %(default)s)")
  p.add_argument("--batch-size", type=int, default=0, help="rows per batch (0 = the config's)")
  p.add_argument("--seq-len", type=int, default=0,
                 help="tokens per row (0 = enough for the resolution policy)")
  p.add_argument("--max-images", type=int, default=0, help="images per row (0 = the config's)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
  add_model_args(p)
  p.add_argument("--only", default="", help="comma-separated evaluators of config.evals")
  p.add_argument("--zeroshot", default="", metavar="DATASET",
                 help="add a zero-shot evaluator: demo:TASK | folder:DIR | arrayrecord:GLOB "
                 "| tfrecord:GLOB | webdataset:PATTERN | tfds:NAME")
  p.add_argument("--retrieval", default="", metavar="DATASET",
                 help="add a retrieval evaluator: demo | coco:JSON | karpathy:JSON | "
                 "tfrecord:GLOB | webdataset:PATTERN")
  p.add_argument("--classnames", default="", help="zero-shot class names: imagenet or a file")
  p.add_argument("--templates", default="", help="clip | clip_short | a file")
  p.add_argument("--resolution", default="budget:256", help="policy of the added evaluator")
  p.add_argument("--max-examples", type=int, default=0, help="first N records only (0 = all)")
  p.add_argument("--budgets", default="",
                 help="sweep every zero-shot evaluator over these patch budgets, e.g. "
                 "64,128,256,576,1024: a table and a PNG in the workdir")


def add_embed_args(p: argparse.ArgumentParser) -> None:
  add_model_args(p)
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--images", help="a directory, glob, .txt list of paths, image file, or "
                    "a random-access dataset (demo, folder:DIR, arrayrecord:GLOB, "
                    "coco:JSON, ...)")
  what.add_argument("--texts", help="a text file, one text per line")
  p.add_argument("--out", required=True,
                 help="output prefix: OUT.npy + OUT.jsonl, or OUT.parquet")
  p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
  p.add_argument("--chunk", type=int, default=4096, help="inputs per resumable chunk")
  p.add_argument("--workers", type=int, default=0, help="decoding processes (0 = in process)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_shape_args(p)


def add_export_args(p: argparse.ArgumentParser) -> None:
  add_model_args(p)
  p.add_argument("--out", required=True, help="the export directory")
  p.add_argument("--tf", action="store_true",
                 help="also write a TensorFlow SavedModel (needs navit-clip[tf])")
  p.add_argument("--text-batch", type=int, default=64,
                 help="texts per call of the SavedModel's embed_texts (default: %(default)s)")
  add_shape_args(p)


def run_eval(args: argparse.Namespace, overrides: list[str]) -> dict:
  """Evaluates the restored model; prints and writes workdir/eval_step<N>.json."""
  from navit_clip.config import eval_config, validate
  from navit_clip.config_loading import apply_overrides
  from navit_clip.evaluate.restore import restore_model
  from navit_clip.evaluate.runner import run_all

  restored = restore_model(args.workdir, args.step)
  config = restored.config
  apply_overrides(config, overrides)
  for kind, dataset in (("zeroshot", args.zeroshot), ("retrieval", args.retrieval)):
    if dataset:
      config.evals[f"{CLI_EVAL}_{kind}"] = eval_config(
          kind, dataset, classnames=args.classnames if kind == "zeroshot" else "",
          templates=args.templates if kind == "zeroshot" else "",
          resolution=args.resolution, max_examples=args.max_examples)
  names = [n for n in args.only.split(",") if n] or list(config.evals.keys())
  if args.budgets:
    for name in list(names):
      e = config.evals[name]
      if e.kind == "zeroshot":
        sweep = eval_config("resolutions", e.dataset)
        sweep.update({k: v for k, v in e.items() if k not in ("kind", "budgets")})
        sweep.budgets = args.budgets
        config.evals[f"{name}_resolutions"] = sweep
        names.append(f"{name}_resolutions")
  if not names:
    raise SystemExit(f"no evaluators: {args.workdir}/config.json has no config.evals; add "
                     "one with --zeroshot DATASET or --retrieval DATASET")
  validate(config)
  results = run_all(restored.model, config, names, workdir=args.workdir)
  report = {"workdir": os.path.abspath(args.workdir), "step": restored.step, "evals": results}
  path = os.path.join(args.workdir, f"eval_step{restored.step}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  return report


def _image_source(spec: str, config):
  """A dataset string (kind:arg, or "demo") or image files."""
  from navit_clip.evaluate.datasets import KINDS, load_eval_data
  from navit_clip.evaluate.files import ImageFiles, list_images

  kind, sep, _ = spec.partition(":")
  if spec == "demo" or (sep and kind in KINDS):
    return load_eval_data(spec, config).source
  return ImageFiles(list_images(spec))


def run_embed(args: argparse.Namespace) -> dict:
  """Writes image or text embeddings of the restored model (see navit_clip.embedding_writer)."""
  from navit_clip import embedding_writer
  from navit_clip.data.pipeline import make_tokenizer
  from navit_clip.evaluate.embedder import Embedder
  from navit_clip.evaluate.inference_resolution import ResolutionPolicy
  from navit_clip.evaluate.restore import restore_model

  restored = restore_model(args.workdir, args.step)
  embedder = Embedder(restored.model)
  if args.texts:
    if not hasattr(restored.model, "embed_texts"):
      raise SystemExit(f"--texts needs a contrastive model; {args.workdir} trained a "
                       f"{restored.config.task} model")
    summary = embedding_writer.export_text_embeddings(
        embedder, make_tokenizer(restored.config), embedding_writer.read_texts(args.texts),
        args.out, dtype=args.dtype, chunk=args.chunk, progress=not args.no_progress)
  else:
    summary = embedding_writer.export_image_embeddings(
        embedder, restored.config, _image_source(args.images, restored.config), args.out,
        policy=ResolutionPolicy.parse(args.resolution), dtype=args.dtype, chunk=args.chunk,
        batch_size=args.batch_size, seq_len=args.seq_len, max_images=args.max_images,
        num_workers=args.workers, progress=not args.no_progress)
  print(json.dumps(summary, indent=2))
  return summary


def run_export(args: argparse.Namespace) -> dict:
  """Exports the restored model's encoders (see navit_clip.serving_export)."""
  from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec
  from navit_clip.evaluate.restore import restore_model
  from navit_clip.serving_export import export_model

  restored = restore_model(args.workdir, args.step)
  spec = inference_spec(restored.config, ResolutionPolicy.parse(args.resolution),
                        batch_size=args.batch_size, seq_len=args.seq_len,
                        max_images=args.max_images)
  manifest = export_model(restored.model, spec, restored.config.model.text.max_len, args.out,
                          tf=args.tf, text_batch=args.text_batch)
  print(json.dumps(manifest, indent=2))
  return manifest
