"""The `navit-clip` command line.

  navit-clip demo [--workdir DIR] [--config.KEY=VALUE ...]
  navit-clip train --config NAME|FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]
  navit-clip tokenizer train --input captions.txt --vocab-size N --out x.model
  navit-clip eval --workdir DIR [--step N] [--zeroshot DATASET] [--budgets 64,128,...]
  navit-clip embed --workdir DIR --images PATH|GLOB|DATASET | --texts FILE --out OUT
  navit-clip export --workdir DIR --out DIR [--tf]
"""

from __future__ import annotations

import argparse
import sys

from navit_clip import commands

_EPILOG = """\
Configs are Python files with get_config(arg) (see configs/); name one by file path or by
its name under configs/ ("demo", "siglip_navit_b16"). Any field can be overridden:
--config.model.image.variant=B/16 --config.optim.lr=1e-3 --config.data.batch_size=256.
"""


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates --config.KEY=VALUE items from the other arguments."""
  rest, overrides = [], []
  for item in argv:
    if item.startswith("--config."):
      overrides.append(item[len("--config."):])
    else:
      rest.append(item)
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="navit-clip", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Native-resolution CLIP/SigLIP pretraining with a packed NaViT image tower.",
      epilog=_EPILOG)
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  demo = sub.add_parser(
      "demo", help="train a tiny model on built-in synthetic data, then zero-shot it",
      description="Trains configs/demo.py (a tiny SigLIP NaViT) on synthetic coloured "
      "shapes at native aspect ratios, then zero-shot classifies held-out images by shape "
      "and colour and prints the accuracies against chance. Minutes on a 2-core CPU.",
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  demo.add_argument("--workdir", default="runs/demo",
                    help="where the tokenizer, checkpoints and metrics go (default: %(default)s)")

  train = sub.add_parser(
      "train", help="train from a config (contrastive or classification)",
      description="Trains the model a config describes; resumes from the latest checkpoint "
      "in --workdir if there is one. Writes config.json, metrics.jsonl, tensorboard/ and "
      "checkpoints/ into the workdir.",
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  train.add_argument("--config", required=True, help="config name or file, optionally :ARG")
  train.add_argument("--workdir", required=True, help="output and resume directory")

  ev = sub.add_parser(
      "eval", help="evaluate a trained workdir: zero-shot, retrieval, resolution sweeps",
      description="Restores the latest (or --step) checkpoint of a workdir and runs the "
      "evaluators of its config.evals, plus any added here; prints the results as JSON and "
      "writes them to WORKDIR/eval_step<N>.json (sweeps also write a table and a PNG).",
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands.add_eval_args(ev)
  emb = sub.add_parser(
      "embed", help="write image or text embeddings of a trained workdir",
      description="Embeds images (packed several per row) or texts, in input order, into "
      "OUT.npy + OUT.jsonl (or OUT.parquet); unusable images are listed in "
      "OUT.skipped.jsonl. Resumable: an interrupted run continues where it stopped.")
  commands.add_embed_args(emb)
  ex = sub.add_parser(
      "export", help="export the encoders: StableHLO (jax.export), TF SavedModel",
      description="Writes the image and text encoders of a trained workdir as serialised "
      "StableHLO and, with --tf, a TensorFlow SavedModel; both take packed batches of the "
      "shape given by --resolution / --batch-size / --seq-len / --max-images.")
  commands.add_export_args(ex)

  tok = sub.add_parser("tokenizer", help="SentencePiece tokenizer tools")
  tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
  tt = tok_sub.add_parser("train", help="train a SentencePiece model on captions",
                          description="Trains a SentencePiece model on a text file with one "
                          "caption per line (empty lines skipped).")
  tt.add_argument("--input", required=True, help="text file, one caption per line")
  tt.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
  tt.add_argument("--out", required=True, help="the .model file to write")
  tt.add_argument("--lowercase", action="store_true", help="fold case inside the model")

  data = sub.add_parser("data", help="convert and inspect datasets")
  data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
  source_help = ("source kind: arrayrecord | webdataset | tfrecord | folder | class_folders "
                 "| demo")
  conv = data_sub.add_parser(
      "convert", help="convert a source to ArrayRecord shards (parallel, resumable)",
      description="Writes the records of a source as ArrayRecord shards of tf.train.Example "
      "(one shard per input file, or per --records-per-shard records), in parallel, with a "
      "progress bar. Run it again to resume: complete shards are skipped. Feature keys "
      "and limits come from --config.data.* overrides (e.g. "
      "--config.data.example_keys.caption=texts).",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  insp = data_sub.add_parser(
      "inspect", help="counts, resolution / aspect / caption histograms, unreadable records",
      description="Reads a source (every record, or --limit of them spread over its files), "
      "decodes every image and prints counts, unusable records by reason, formats and "
      "histograms of resolution, aspect ratio, caption length and captions per image.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  for sp in (conv, insp):
    sp.add_argument("--source", required=True, help=source_help)
    sp.add_argument("--files", default="",
                    help="files (comma-separated globs / brace ranges) or the folder")
    sp.add_argument("--workers", type=int, default=1, help="processes (default: %(default)s)")
  conv.add_argument("--out", required=True, help="output directory")
  conv.add_argument("--records-per-shard", type=int, default=10_000,
                    help="random-access sources: records per output shard")
  conv.add_argument("--prefix", default="data", help="shard file name prefix")
  insp.add_argument("--limit", type=int, default=0, help="at most this many records (0 = all)")
  insp.add_argument("--json", default="", help="also write the report as JSON here")
  return p


def _data_config(args, overrides: list[str]):
  from navit_clip.config import default_config
  from navit_clip.config_loading import apply_overrides
  config = default_config()
  config.data.source = args.source
  config.data.train_files = args.files
  apply_overrides(config, overrides)
  return config


def _run_data(args, overrides: list[str]) -> None:
  config = _data_config(args, overrides)
  if args.data_command == "convert":
    from navit_clip.data.convert import convert
    counts = convert(config, args.out, workers=args.workers,
                     records_per_shard=args.records_per_shard, prefix=args.prefix)
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped/")}
    print(f"wrote {counts.get('written', 0)} of {counts.get('records', 0)} records to "
          f"{args.out}; skipped: {skipped or 'none'}")
  else:
    import json
    from navit_clip.data.inspect import inspect_source
    report = inspect_source(config, limit=args.limit, workers=args.workers)
    print(report.format())
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=2)


def _mark_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; mark them parsed with their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  if overrides and args.command not in ("train", "demo", "eval"):
    _parser().error(f"--config.* overrides apply to train, demo and eval, not {args.command}")
  _mark_absl_flags_parsed()

  if args.command == "demo":
    from navit_clip.demo import run_demo
    run_demo(args.workdir, overrides)
  elif args.command == "train":
    from navit_clip.config_loading import apply_overrides, load_config
    from navit_clip.train import train
    config = load_config(args.config)
    apply_overrides(config, overrides)
    train(config, args.workdir)
  elif args.command == "eval":
    commands.run_eval(args, overrides)
  elif args.command == "embed":
    commands.run_embed(args)
  elif args.command == "export":
    commands.run_export(args)
  elif args.command == "tokenizer":
    from navit_clip.text.tokenizer import train_from_file
    train_from_file(args.input, args.vocab_size, args.out, lowercase=args.lowercase)
    print(f"wrote {args.out}")
  elif args.command == "data":
    _run_data(args, overrides)
  return 0


if __name__ == "__main__":
  sys.exit(main())
