"""Importing a public checkpoint into a workdir that every command can read.

`import_checkpoint(src, workdir)` writes what training writes, so evaluation, embedding,
export and `config.init` read the result as they read a trained run:
  workdir/config.json       the defaults with the checkpoint's towers, its tokenizer and
                            the inference resolution policy of its image processor
  workdir/tokenizer.model   the checkpoint's SentencePiece model, copied; config.json names
                            it relative to the workdir (navit_clip.workdir)
  workdir/checkpoints/0/    one Orbax checkpoint: the state {"params", "step": 0}
Formats: transformers SigLIP, SigLIP 2 and SigLIP 2 NaFlex folders (config.json +
model.safetensors + spiece.model or tokenizer.model, optionally preprocessor_config.json;
navit_clip.transformers_siglip). `src` is such a folder, a file in it, or, where
huggingface_hub is installed, a model id on the Hugging Face Hub ("google/siglip2-base-
patch16-naflex"), fetched into its cache (or read from there). And big_vision's own
releases: a SigLIP / SigLIP 2 / SigLIP 2 NaFlex .npz file (navit_clip.big_vision_siglip),
whose architecture its tensors' shapes give, with the SentencePiece model given apart or
lying beside it.
The state has no optimizer state: to train on from it, start a new run with
`config.init.checkpoint = workdir` and `config.init.params = "image;text"` or a subset.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx

from navit_clip import storage
from navit_clip.checkpoint import Checkpointer
from navit_clip.config_defaults import default_config
from navit_clip.errors import MissingInputError, UserError
from navit_clip.model import build_model
from navit_clip import big_vision_siglip, transformers_siglip
from navit_clip.transformers_siglip import TOKENIZER_FILES, Architecture, TokenizerFiles
from navit_clip.workdir import WORKDIR_TOKENIZER, save_config

log = logging.getLogger(__name__)
TRANSFORMERS_FILES = ("config.json", "model.safetensors")
HUB_FILES = (*TRANSFORMERS_FILES, *TOKENIZER_FILES, "tokenizer_config.json",
             "preprocessor_config.json")


def _from_hub(model_id: str) -> str | None:
  """The local folder of Hub model `model_id` (downloaded if not cached); None without
  huggingface_hub."""
  try:
    import huggingface_hub  # optional: only to resolve a model id
  except ImportError:
    return None
  try:
    return huggingface_hub.snapshot_download(model_id, allow_patterns=list(HUB_FILES))
  except (OSError, ValueError) as e:  # its HTTP, offline and cache errors are OSErrors
    raise UserError(f"model {model_id!r} is not a local folder and could not be fetched "
                    f"from the Hugging Face Hub: {e}") from e


def resolve_source(src: str) -> str:
  """The checkpoint folder that `src` names: the folder, a file's folder, or a Hub model id.

  Raises:
    MissingInputError: `src` is none of these (naming what was tried).
  """
  if os.path.isdir(src):
    return os.path.abspath(src)
  if os.path.isfile(src):
    return os.path.dirname(os.path.abspath(src))
  if src.count("/") == 1 and not src.startswith((".", "/")):
    folder = _from_hub(src)
    if folder is not None:
      return folder
    raise MissingInputError(f"{src!r} is not a folder or file here; to fetch a model id from "
                            "the Hugging Face Hub, install huggingface_hub")
  raise MissingInputError(f"checkpoint {src!r} does not exist")


def _by_name(tree) -> dict:
  """{"image/encoder/blocks/0/norm1/scale": leaf, ...} of a nested dict of arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def _set_tokenizer(config: ml_collections.ConfigDict, path: str, pad_piece: str) -> None:
  """config.data.tokenizer and the text tower's EOS id for the SentencePiece model `path`.

  SigLIP and SigLIP 2 were trained on lowercased captions, whatever their tokenizers do.
  """
  sp = spm.SentencePieceProcessor(model_file=path)
  pad_id = sp.piece_to_id(pad_piece)
  if sp.id_to_piece(pad_id) != pad_piece:
    raise UserError(f"{path}: the pad token {pad_piece!r} of tokenizer_config.json is not a "
                    "piece of the SentencePiece model")
  if sp.eos_id() < 0:
    raise UserError(f"{path}: the SentencePiece model has no EOS piece")
  if sp.get_piece_size() > config.model.text.vocab_size:
    raise UserError(f"{path}: {sp.get_piece_size()} pieces, more than the text tower's "
                    f"vocab_size {config.model.text.vocab_size}")
  config.model.text.eos_id = sp.eos_id()
  tok = config.data.tokenizer
  tok.path, tok.lowercase, tok.pad_id = path, True, pad_id


def _checked_params(config: ml_collections.ConfigDict, params: dict) -> dict:
  """`params` as jax arrays, after checking them against the parameters of config's model."""
  abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  want = _by_name(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  got = _by_name(params)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise UserError(f"imported parameters do not fit the model: missing {missing[:8]}, "
                    f"unexpected {extra[:8]}")
  for name, leaf in want.items():
    if tuple(leaf.shape) != np.shape(got[name]):
      raise UserError(f"imported parameter {name} has shape {list(np.shape(got[name]))}, "
                      f"the model's is {list(leaf.shape)}")
  return jax.tree.map(jnp.asarray, params)


@dataclasses.dataclass(frozen=True)
class Source:
  """What a checkpoint file or folder gives: its towers, weights, image policy, tokenizer."""

  name: str  # the checkpoint, for the log
  arch: Architecture
  params: dict  # nested dict of float32 arrays, as nnx.to_pure_dict gives them
  inference_resolution: str
  tokenizer: TokenizerFiles


def _transformers_source(src: str, tokenizer: str | None) -> Source:
  """The transformers checkpoint folder (file in it, or Hub model id) `src`."""
  if tokenizer:
    raise UserError(f"tokenizer {tokenizer!r}: a transformers checkpoint folder brings its own "
                    "tokenizer; a tokenizer is given only with a big_vision .npz file")
  src = resolve_source(src)
  missing = [f for f in TRANSFORMERS_FILES if not os.path.isfile(os.path.join(src, f))]
  if missing:
    raise UserError(f"{src} is not a transformers checkpoint folder: it lacks {missing}")
  arch = transformers_siglip.read_architecture(src)
  return Source(src, arch, transformers_siglip.read_params(src, arch),
                transformers_siglip.inference_resolution(src, arch),
                transformers_siglip.find_tokenizer(src))


def _big_vision_source(path: str, tokenizer: str | None) -> Source:
  """The big_vision .npz file `path`, with the SentencePiece model `tokenizer` (default: the
  spiece.model or tokenizer.model beside it)."""
  if not os.path.isfile(path):
    raise MissingInputError(f"checkpoint {path!r} does not exist")
  ckpt = big_vision_siglip.load(path)
  arch = big_vision_siglip.read_architecture(ckpt)
  return Source(os.path.abspath(path), arch, big_vision_siglip.read_params(ckpt, arch),
                big_vision_siglip.inference_resolution(arch),
                big_vision_siglip.find_tokenizer(path, tokenizer))


def _imported_config(source: Source) -> ml_collections.ConfigDict:
  """The default config with `source`'s towers, loss and image policy (tokenizer: later)."""
  config = default_config()
  transformers_siglip.configure(config, source.arch)
  config.data.seq_len = source.arch.posemb_side ** 2  # the sequence it was trained at
  config.data.resolution.kind = "patch_budget"
  config.data.resolution.patch_budget = config.data.seq_len
  config.inference_resolution = source.inference_resolution
  return config


def import_checkpoint(src: str, workdir: str, tokenizer: str | None = None
                      ) -> ml_collections.ConfigDict:
  """Writes the workdir of the checkpoint `src` (see the module docstring).

  Args:
    src: a transformers folder, a file in one, or a Hub model id; or a big_vision .npz.
    workdir: the workdir to write, a local folder or a URL (gs://, s3://); it must hold no
      checkpoints.
    tokenizer: the SentencePiece model of a big_vision .npz (default: beside it).
  Returns:
    The config written to workdir/config.json, its tokenizer path the workdir's copy
    (absolute; config.json names it relative to the workdir).
  Raises:
    UserError: `src` is not a checkpoint this module reads (naming the file and what is
      wrong), or `workdir` already holds checkpoints.
  """
  workdir = storage.absolute(workdir)
  checkpoints = storage.join(workdir, "checkpoints")
  if storage.isdir(checkpoints) and storage.listdir(checkpoints):
    raise UserError(f"{checkpoints} already holds checkpoints; import into a new workdir")
  source = (_big_vision_source(src, tokenizer) if src.endswith(".npz")
            else _transformers_source(src, tokenizer))
  config = _imported_config(source)
  params = _checked_params(config, source.params)
  _set_tokenizer(config, source.tokenizer.model_path, source.tokenizer.pad_piece)
  save_config(config, workdir)
  config.data.tokenizer.path = storage.join(workdir, WORKDIR_TOKENIZER)
  ckpt = Checkpointer(checkpoints, max_to_keep=None, async_save=False)
  try:
    ckpt.save_and_wait(0, {"params": params, "step": jnp.zeros((), jnp.int32)})
  finally:
    ckpt.close()
  log.info("imported %s (%s image tower %s, text tower %s, images at %s) into %s", source.name,
           "NaFlex" if source.arch.naflex else "fixed-resolution", config.model.image.variant,
           config.model.text.variant, config.inference_resolution, workdir)
  return config
