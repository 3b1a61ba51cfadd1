"""The `navit-clip` command line.

  navit-clip demo [--workdir DIR] [--config.KEY=VALUE ...]
  navit-clip train --config NAME|FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]
  navit-clip tokenizer train --input captions.txt --vocab-size N --out x.model
"""

from __future__ import annotations

import argparse
import sys

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

  tok = sub.add_parser("tokenizer", help="SentencePiece tokenizer tools")
  tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
  tt = tok_sub.add_parser("train", help="train a SentencePiece model on captions",
                          description="Trains a SentencePiece model on a text file with one "
                          "caption per line (empty lines skipped).")
  tt.add_argument("--input", required=True, help="text file, one caption per line")
  tt.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
  tt.add_argument("--out", required=True, help="the .model file to write")
  tt.add_argument("--lowercase", action="store_true", help="fold case inside the model")
  return p


def _mark_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; mark them parsed with their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  if overrides and args.command not in ("train", "demo"):
    _parser().error(f"--config.* overrides apply to train and demo, not {args.command}")
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
  elif args.command == "tokenizer":
    from navit_clip.text.tokenizer import train_from_file
    train_from_file(args.input, args.vocab_size, args.out, lowercase=args.lowercase)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
