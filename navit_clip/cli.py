"""The `navit-clip` command line: the parsers, logging set-up, dispatch and error handling.

  navit-clip [--debug] COMMAND ...
  navit-clip demo [--workdir DIR] [--config.KEY=VALUE ...]
  navit-clip study [--workdir DIR] [--quick] [--config.KEY=VALUE ...]
  navit-clip train --config NAME|FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]
  navit-clip eval --workdir DIR [--step N] [--zeroshot DATASET] [--budgets 64,128,...]
  navit-clip embed --workdir DIR --images PATH|GLOB|DATASET | --texts FILE --out OUT
  navit-clip export --workdir DIR --out DIR [--tf] [--overwrite]
  navit-clip import --from DIR|FILE|MODEL_ID|FILE.npz [--tokenizer FILE] --workdir DIR
  navit-clip tokenizer train --input captions.txt --vocab-size N --out x.model
  navit-clip data convert|inspect --source KIND --files PATTERN ...

Each command runs as `navit_clip.commands.run_<command>(args, overrides)`. A user error
(bad config, missing file, bad data: see `navit_clip.errors`) prints one line
"navit-clip: error: ..." and exits 2; --debug or NAVIT_CLIP_DEBUG=1 adds its traceback.
Any other exception is a defect and keeps its traceback. Messages go to stderr through
`logging`; the results of a command are printed to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from navit_clip import commands, errors

_EPILOG = """\
Configs are Python files with get_config(arg) (see configs/); name one by file path or by
its name under configs/ ("demo", "siglip_navit_b16"). Any field can be overridden:
--config.model.image.variant=B/16 --config.optim.lr=1e-3 --config.data.batch_size=256.
"""
_YOUR_DATA = """\
Your data: --config.data.source=folder (a folder of images with captions.jsonl or
captions.csv, or the index file) | webdataset (img2dataset tar shards: KEY.jpg with KEY.txt
or KEY.json) | tfrecord | arrayrecord (tf.train.Example) | class_folders | mixture, and
--config.data.train_files= the folder, or the shards as globs and brace ranges
('shards/{00000..00999}.tar'; local, s3://, gs:// or https://). Captions are tokenized by
--config.data.tokenizer.path= a SentencePiece model (`navit-clip tokenizer train`).
Example features: --config.data.example_keys.image= / .caption= (default image/encoded,
caption). Check a source with `navit-clip data inspect` first; README.md, "Train on your
own data", walks through it.

"""
_TAKES_OVERRIDES = ("demo", "study", "train", "eval", "data")
LOG_FORMAT = "%(asctime)s %(process_prefix)s%(levelname)s %(name)s: %(message)s"
USER_ERROR_EXIT = 2


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates --config.KEY=VALUE items from the other arguments."""
  rest, overrides = [], []
  for item in argv:
    if item.startswith("--config."):
      overrides.append(item[len("--config."):])
    else:
      rest.append(item)
  return rest, overrides


def _command(sub, name: str, run, help: str, description: str,
             epilog: str | None = None) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.set_defaults(run=run)
  p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show the traceback of user errors too (or set NAVIT_CLIP_DEBUG=1)")
  return p


def _add_demo(sub) -> None:
  p = _command(
      sub, "demo", commands.run_demo,
      "train a tiny model on built-in synthetic data, then zero-shot it",
      "Trains configs/demo.py (a tiny SigLIP NaViT) on synthetic coloured shapes at native "
      "aspect ratios, then zero-shot classifies held-out images by shape and colour and "
      "prints the accuracies against chance. Minutes on a 2-core CPU.", _EPILOG)
  p.add_argument("--workdir", default="runs/demo",
                 help="where the tokenizer, checkpoints and metrics go (default: %(default)s)")


def _add_study(sub) -> None:
  p = _command(
      sub, "study", commands.run_study,
      "measure the NaViT claims in miniature on built-in data (under an hour on 2 cores)",
      "Trains tiny SigLIP towers (configs/study.py) on built-in shapes whose class depends "
      "on their own aspect ratio, at equal compute (the same real patch tokens): NaViT "
      "against a square-resize ViT, three position embeddings at sides in and out of the "
      "training range, token dropping, and one model at many resolutions. Writes study.md, "
      "results.json and PNG plots into the workdir. --config.* overrides apply to every run.",
      _EPILOG)
  p.add_argument("--workdir", default="runs/study",
                 help="where the runs, the tables and the plots go (default: %(default)s)")
  p.add_argument("--quick", action="store_true",
                 help="minutes: tiny budgets, one seed, a few resolutions (checks the machinery)")


def _add_train(sub) -> None:
  p = _command(
      sub, "train", commands.run_train, "train from a config (contrastive or classification)",
      "Trains the model a config describes; resumes from the latest checkpoint in --workdir "
      "if there is one. Writes config.json, metrics.jsonl, tensorboard/ and checkpoints/ "
      "into the workdir.", _YOUR_DATA + _EPILOG)
  p.add_argument("--config", required=True, help="config name or file, optionally :ARG")
  p.add_argument("--workdir", required=True, help="output and resume directory")


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="a training workdir (config.json, checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


_RESOLUTION_HELP = ("budget:N | side:S | native | naflex:N | square:S (default: the workdir's "
                    "config.inference_resolution: budget:256, or an imported checkpoint's "
                    "own)")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--resolution", default="", help=_RESOLUTION_HELP)
  p.add_argument("--batch-size", type=int, default=0, help="rows per batch (0 = the config's)")
  p.add_argument("--seq-len", type=int, default=0,
                 help="tokens per row (0 = enough for the resolution policy)")
  p.add_argument("--max-images", type=int, default=0, help="images per row (0 = the config's)")


def _add_eval(sub) -> None:
  p = _command(
      sub, "eval", commands.run_eval,
      "evaluate a trained workdir: zero-shot, retrieval, resolution sweeps",
      "Restores the latest (or --step) checkpoint of a workdir and runs the evaluators of "
      "its config.evals, plus any added here; prints the results as JSON and writes them to "
      "WORKDIR/eval_step<N>.json (sweeps also write a table and a PNG).", _EPILOG)
  _add_model_args(p)
  p.add_argument("--only", default="", help="comma-separated evaluators of config.evals")
  p.add_argument("--zeroshot", default="", metavar="DATASET",
                 help="add a zero-shot evaluator: demo:TASK | folder:DIR | arrayrecord:GLOB "
                 "| tfrecord:GLOB | webdataset:PATTERN | tfds:NAME")
  p.add_argument("--retrieval", default="", metavar="DATASET",
                 help="add a retrieval evaluator: demo | coco:JSON | karpathy:JSON | "
                 "tfrecord:GLOB | webdataset:PATTERN")
  p.add_argument("--classnames", default="",
                 help="zero-shot class names: imagenet or a file; names that match the "
                 "dataset's classes (folder names) are matched by name, others by position")
  p.add_argument("--templates", default="", help="clip | clip_short | a file")
  p.add_argument("--resolution", default="",
                 help=f"policy of the added evaluator: {_RESOLUTION_HELP}")
  p.add_argument("--max-examples", type=int, default=0, help="first N records only (0 = all)")
  p.add_argument("--budgets", default="",
                 help="sweep every zero-shot evaluator over these patch budgets, e.g. "
                 "64,128,256,576,1024: a table and a PNG in the workdir")


def _add_embed(sub) -> None:
  p = _command(
      sub, "embed", commands.run_embed, "write image or text embeddings of a trained workdir",
      "Embeds images (packed several per row) or texts, in input order, into OUT.npy + "
      "OUT.jsonl (or OUT.parquet); unusable images are listed in OUT.skipped.jsonl. "
      "Resumable: an interrupted run continues where it stopped.")
  _add_model_args(p)
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
  p.add_argument("--no-progress", action="store_true",
                 help="no progress lines (done, rate, ETA)")
  _add_shape_args(p)


def _add_export(sub) -> None:
  p = _command(
      sub, "export", commands.run_export,
      "export the encoders: StableHLO (jax.export), TF SavedModel",
      "Writes the image and text encoders of a trained workdir as serialised StableHLO and, "
      "with --tf, a TensorFlow SavedModel; both take packed batches of the shape given by "
      "--resolution / --batch-size / --seq-len / --max-images.")
  _add_model_args(p)
  p.add_argument("--out", required=True, help="the export directory (new or empty)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an export already in --out")
  p.add_argument("--tf", action="store_true",
                 help="also write a TensorFlow SavedModel (needs navit-clip[tf])")
  p.add_argument("--text-batch", type=int, default=64,
                 help="texts per call of the SavedModel's embed_texts (default: %(default)s)")
  p.add_argument("--platforms", default="cpu,cuda,tpu",
                 help="platforms the StableHLO is lowered for, of cpu, cuda, rocm, tpu "
                 "(default: %(default)s; a model with a platform's own attention kernel "
                 "exports for that platform only)")
  _add_shape_args(p)


def _add_import(sub) -> None:
  p = _command(
      sub, "import", commands.run_import,
      "import a public SigLIP / SigLIP 2 checkpoint into a new workdir",
      "Reads a transformers SigLIP, SigLIP 2 or SigLIP 2 NaFlex checkpoint (config.json, "
      "model.safetensors, its SentencePiece tokenizer, preprocessor_config.json), or a "
      "big_vision release of one (a .npz file and its SentencePiece model), and writes a "
      "workdir that eval, embed, export and config.init read like a trained run's: "
      "config.json (with the image processor's resolution policy), tokenizer.model and "
      "checkpoint 0.")
  p.add_argument("--from", dest="source", required=True, metavar="DIR|FILE|MODEL_ID",
                 help="the checkpoint folder or a file in it; a Hugging Face Hub model id "
                 "(e.g. google/siglip2-base-patch16-naflex) when huggingface_hub is "
                 "installed; or a big_vision .npz file (e.g. siglip2_b16_naflex.npz)")
  p.add_argument("--tokenizer", default="", metavar="FILE",
                 help="the SentencePiece model of a big_vision .npz (default: spiece.model "
                 "or tokenizer.model beside it)")
  p.add_argument("--workdir", required=True, help="the workdir to write (without checkpoints)")


def _add_tokenizer(sub) -> None:
  tok = sub.add_parser("tokenizer", help="SentencePiece tokenizer tools")
  actions = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
  p = _command(actions, "train", commands.run_tokenizer_train,
               "train a SentencePiece model on captions",
               "Trains a SentencePiece model on a UTF-8 text file with one caption per line "
               "(empty lines skipped).")
  p.add_argument("--input", required=True, help="text file, one caption per line")
  p.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
  p.add_argument("--out", required=True, help="the .model file to write")
  p.add_argument("--lowercase", action="store_true", help="fold case inside the model")


def _add_data_source_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--source", required=True, help="source kind: arrayrecord | webdataset | "
                 "tfrecord | folder | class_folders | demo")
  p.add_argument("--files", default="",
                 help="files (comma-separated globs / brace ranges) or the folder")
  p.add_argument("--workers", type=int, default=1, help="processes (default: %(default)s)")


def _add_data(sub) -> None:
  data = sub.add_parser("data", help="convert and inspect datasets")
  actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
  conv = _command(
      actions, "convert", commands.run_data_convert,
      "convert a source to ArrayRecord shards (parallel, resumable)",
      "Writes the records of a source as ArrayRecord shards of tf.train.Example (one shard "
      "per input file, or per --records-per-shard records), in parallel, logging its "
      "progress. Run it again to resume: complete shards are skipped. Feature keys and limits "
      "come from --config.data.* overrides (e.g. --config.data.example_keys.caption=texts).")
  _add_data_source_args(conv)
  conv.add_argument("--out", required=True, help="output directory")
  conv.add_argument("--records-per-shard", type=int, default=10_000,
                    help="random-access sources: records per output shard")
  conv.add_argument("--prefix", default="data", help="shard file name prefix")
  insp = _command(
      actions, "inspect", commands.run_data_inspect,
      "counts, resolution / aspect / caption histograms, unreadable records",
      "Reads a source (every record, or --limit of them spread over its files), decodes "
      "every image and prints counts, unusable records by reason, formats and histograms of "
      "resolution, aspect ratio, caption length and captions per image. Limits come from "
      "--config.data.* overrides.")
  _add_data_source_args(insp)
  insp.add_argument("--limit", type=int, default=0, help="at most this many records (0 = all)")
  insp.add_argument("--json", default="", help="also write the report as JSON here")


def parser() -> argparse.ArgumentParser:
  """The parser of the whole command line (--config.* overrides are split off before)."""
  p = argparse.ArgumentParser(
      prog="navit-clip", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Native-resolution CLIP/SigLIP pretraining with a packed NaViT image tower.",
      epilog=_EPILOG)
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of user errors too (or set NAVIT_CLIP_DEBUG=1)")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for add in (_add_demo, _add_study, _add_train, _add_eval, _add_embed, _add_export,
              _add_import, _add_tokenizer, _add_data):
    add(sub)
  return p


class _ProcessPrefix(logging.Filter):
  """Sets record.process_prefix: "[process i/n] " in a multi-process JAX run, else ""."""

  def filter(self, record: logging.LogRecord) -> bool:
    jax = sys.modules.get("jax")  # not imported: no multi-process run has started
    distributed = getattr(jax, "distributed", None)
    multi = distributed is not None and distributed.is_initialized()
    record.process_prefix = (f"[process {jax.process_index()}/{jax.process_count()}] "
                             if multi else "")
    return True


def setup_logging() -> None:
  """INFO from navit_clip and WARNING from other libraries, to stderr, in LOG_FORMAT.

  Where logging is configured already (an application calling `main`), only the level of
  navit_clip's loggers is set.
  """
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
  handler.addFilter(_ProcessPrefix())
  logging.basicConfig(handlers=[handler])
  logging.getLogger("navit_clip").setLevel(logging.INFO)


def _mark_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; mark them parsed with their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is the input's fault (see `navit_clip.errors`) rather than a defect.

  User errors: UserError (a data source with nothing usable among them), and a path the
  input names that is missing, not permitted, or a file / directory where the other is
  needed.
  """
  return isinstance(error, (errors.UserError, FileNotFoundError, PermissionError,
                            IsADirectoryError, NotADirectoryError))


def _report_user_error(error: BaseException, debug: bool) -> int:
  if debug:
    traceback.print_exception(error)
  lines = [line.strip() for line in errors.message(error).splitlines() if line.strip()]
  print(f"navit-clip: error: {' '.join(lines) or type(error).__name__}", file=sys.stderr,
        flush=True)
  return USER_ERROR_EXIT


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv[1:]); returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  p = parser()
  args = p.parse_args(rest)
  if overrides and args.command not in _TAKES_OVERRIDES:
    p.error(f"--config.* overrides apply to {', '.join(_TAKES_OVERRIDES)}, not {args.command}")
  setup_logging()
  _mark_absl_flags_parsed()
  debug = args.debug or os.environ.get("NAVIT_CLIP_DEBUG", "") not in ("", "0")
  try:
    args.run(args, overrides)
  except Exception as e:  # noqa: BLE001 -- user errors become one line, defects re-raise
    if not is_user_error(e):
      raise
    return _report_user_error(e, debug)
  return 0


if __name__ == "__main__":
  sys.exit(main())
