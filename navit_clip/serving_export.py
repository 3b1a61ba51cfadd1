"""Exporting the image and text encoders: serialised StableHLO and a TensorFlow SavedModel.

Both take packed batches of one static shape (the `BatchSpec` chosen at export):

  image encoder  patches uint8 [B, L, P*P*C], segment_ids int32 [B, L],
                 positions int32 [B, L, 2], grid_hw int32 [B, L, 2], image_mask bool [B, M]
                 -> embeddings float32 [B, M, D] (L2-normalised; zero in empty slots)
  text encoder   tokens int32 [N, T] -> embeddings float32 [N, D] (L2-normalised); N is
                 symbolic in the StableHLO export (any batch size) and `text_batch` in the
                 SavedModel (TF's XLA op cannot check a symbolic shape of a newer StableHLO)
The StableHLO serialisations are lowered for the `platforms` given, by default PLATFORMS
(CPU, CUDA and TPU: jax.export lowers for a platform without its devices), so one export
serves on each; a model whose attention backend is one platform's kernel (cudnn,
pallas_gpu, splash) lowers for that platform only.

Files in the export directory:
  image_encoder.jax_export, text_encoder.jax_export   `jax.export` serialisations (StableHLO
      with the weights inlined as constants); load with `load_jax_export`, or the whole
      export with `load_export`
  tokenizer.model  the SentencePiece model that makes the text encoder's tokens (with
      the tokenizer given): export.json's "tokenizer" says how (`load_tokenizer`)
  saved_model/   (with `tf=True`, needs the `tf` extra) signatures "embed_images" and
      "embed_texts", weights as variables
  export.json    the batch shape, input names, dtypes and shapes, the embedding width, the
      platforms, the tokenizer and the resolution policy images are resized by
An existing non-empty export directory is refused unless `overwrite=True`, which replaces
these files (and only these) in it. The directory may be a URL (s3://, gs://:
navit_clip.storage); the SavedModel is then written to a local temporary folder and
uploaded. An export loads back from a local directory or a URL alike (`load_export`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from navit_clip import storage
from navit_clip.data.batch import BatchSpec
from navit_clip.errors import UserError
from navit_clip.evaluate.inference_batches import inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy
from navit_clip.text.tokenizer import Tokenizer

IMAGE_INPUTS = ("patches", "segment_ids", "positions", "grid_hw", "image_mask")
IMAGE_FILE = "image_encoder.jax_export"
TEXT_FILE = "text_encoder.jax_export"
SAVED_MODEL_DIR = "saved_model"
MANIFEST_FILE = "export.json"
TOKENIZER_FILE = "tokenizer.model"
EXPORT_FILES = (IMAGE_FILE, TEXT_FILE, SAVED_MODEL_DIR, MANIFEST_FILE, TOKENIZER_FILE)
PLATFORMS = ("cpu", "cuda", "tpu")


def prepare_out_dir(out_dir: str, overwrite: bool = False) -> None:
  """Creates `out_dir` (local or a URL), or clears a previous export from it when
  `overwrite`.

  Raises:
    UserError: `out_dir` is a file, or a non-empty directory and `overwrite` is False.
  """
  if storage.exists(out_dir) and not storage.isdir(out_dir):
    raise UserError(f"export directory {out_dir!r} is a file")
  if storage.isdir(out_dir) and storage.listdir(out_dir):
    if not overwrite:
      raise UserError(f"export directory {out_dir!r} is not empty; choose another one or "
                      "pass --overwrite to replace the export in it")
    for name in EXPORT_FILES:
      path = storage.join(out_dir, name)
      if storage.isdir(path):
        storage.remove_tree(path)
      elif storage.exists(path):
        storage.remove(path)
  storage.makedirs(out_dir)


def image_input_specs(spec: BatchSpec) -> dict[str, jax.ShapeDtypeStruct]:
  """The image encoder's inputs for batches of `spec`."""
  shapes = spec.shapes()
  return {k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1]) for k in IMAGE_INPUTS}


def _pure_fns(model: nnx.Module) -> tuple[Callable, Callable, dict]:
  """(image_fn(params, batch), text_fn(params, tokens), params) of a TwoTower model."""
  graphdef, params = nnx.split(model)

  def image_fn(p, batch):
    return nnx.merge(graphdef, p).embed_images(batch)[0]

  def text_fn(p, tokens):
    return nnx.merge(graphdef, p).embed_texts(tokens)

  return image_fn, text_fn, nnx.to_pure_dict(params)


def export_jax(model: nnx.Module, spec: BatchSpec, text_len: int, out_dir: str,
               platforms: tuple[str, ...] = PLATFORMS) -> list[str]:
  """Writes the two `jax.export` serialisations for `platforms`; the text batch size is
  symbolic."""
  image_fn, text_fn, params = _pure_fns(model)
  images = jax.export.export(jax.jit(lambda batch: image_fn(params, batch)),
                             platforms=platforms)(image_input_specs(spec))
  (n,) = jax.export.symbolic_shape("n")
  texts = jax.export.export(jax.jit(lambda tokens: text_fn(params, tokens)),
                            platforms=platforms)(
      jax.ShapeDtypeStruct((n, text_len), jnp.int32))
  paths = []
  for name, exported in ((IMAGE_FILE, images), (TEXT_FILE, texts)):
    path = storage.join(out_dir, name)
    storage.write_atomic(path, bytes(exported.serialize()))
    paths.append(path)
  return paths


def load_jax_export(path: str) -> Callable:
  """A serialised encoder (a local path or a URL) as a callable: image batch dict or tokens
  -> embeddings."""
  return jax.export.deserialize(bytearray(storage.read_bytes(path))).call


def _copy_tokenizer(tokenizer: Tokenizer, out_dir: str) -> dict:
  """Copies the tokenizer's model into `out_dir`; its entry of export.json."""
  storage.copy(tokenizer.path, storage.join(out_dir, TOKENIZER_FILE))
  return {"file": TOKENIZER_FILE, "max_len": tokenizer.max_len,
          "lowercase": tokenizer.lowercase, "pad_id": tokenizer.pad_id,
          "eos_id": tokenizer.eos_id}


def load_tokenizer(export_dir: str) -> Tokenizer:
  """The tokenizer that an export directory (local or a URL) carries, set up as export.json
  says."""
  entry = _read_manifest(export_dir).get("tokenizer")
  if entry is None:
    raise UserError(f"export {export_dir!r} carries no tokenizer")
  return Tokenizer(storage.join(export_dir, entry["file"]), entry["max_len"],
                   lowercase=entry["lowercase"], pad_id=entry["pad_id"])


def _read_manifest(export_dir: str) -> dict:
  path = storage.join(export_dir, MANIFEST_FILE)
  if not storage.exists(path):
    raise UserError(f"{export_dir!r} is not an export directory: it has no {MANIFEST_FILE}")
  return json.loads(storage.read_bytes(path))


@dataclasses.dataclass(frozen=True)
class LoadedExport:
  """An export directory loaded back for serving (see `load_export`).

  Attributes:
    manifest: export.json as a dict.
    image_encoder: packed image batch dict (IMAGE_INPUTS) -> float32 [B, M, D].
    text_encoder: tokens int32 [N, T] (any N) -> float32 [N, D].
    tokenizer: the export's tokenizer, or None when it carries none.
  """

  manifest: dict
  image_encoder: Callable
  text_encoder: Callable
  tokenizer: Tokenizer | None

  @property
  def spec(self) -> BatchSpec:
    """The static shape of the image batches the image encoder takes."""
    return BatchSpec(**self.manifest["batch_spec"])

  def image_batches(self, source, *, resolution: str = "", max_upscale: float = 2.0,
                    num_workers: int = 0) -> Iterator[dict]:
    """Packed batches of `spec` from a random-access `source` of image records ({"image":
    encoded bytes or uint8 [H, W, C], "example_id"}: e.g. navit_clip.evaluate.files.
    ImageFiles), resized by `resolution` (default: the export's policy); each batch keys
    its slots by "example_id" [B, M] where "image_mask" [B, M] is set."""
    resolution = resolution or self.manifest.get("resolution")
    if not resolution:
      raise UserError("this export records no resolution policy: pass resolution=")
    policy = ResolutionPolicy.parse(resolution)
    spec = self.spec
    return inference_batches(source, spec, policy.sampler(spec.patch_size, spec.seq_len,
                                                          max_upscale),
                             num_workers=num_workers, resample=policy.resample,
                             draft=policy.draft)

  def images(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Packed batch of `spec` -> L2-normalised float32 [B, M, D] (zero in empty slots)."""
    return np.asarray(self.image_encoder({k: batch[k] for k in IMAGE_INPUTS}))

  def texts(self, tokens: np.ndarray) -> np.ndarray:
    """int32 [N, T] -> L2-normalised float32 [N, D]."""
    return np.asarray(self.text_encoder(np.asarray(tokens, np.int32)))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Strings, tokenized by the export's tokenizer -> float32 [N, D]."""
    if self.tokenizer is None:
      raise UserError("this export carries no tokenizer: embed tokens with `texts`")
    return self.texts(self.tokenizer.encode(list(texts)))


def load_export(export_dir: str) -> LoadedExport:
  """Loads the StableHLO encoders, the tokenizer and export.json of `export_dir`, a local
  directory or a URL (s3://, gs://: navit_clip.storage); the encoders run on
  any platform they were exported for.

    export = load_export("s3://bucket/exports/siglip")
    text_emb = export.embed_texts(["a photo of a cat"])           # [N, D]
    for batch in export.image_batches(ImageFiles(list_images("s3://bucket/imgs/"))):
      emb = export.images(batch)[batch["image_mask"]]             # [images, D]
      ids = batch["example_id"][batch["image_mask"]]              # their record indices

  Raises:
    UserError: `export_dir` holds no export.json.
  """
  manifest = _read_manifest(export_dir)
  tokenizer = load_tokenizer(export_dir) if manifest.get("tokenizer") else None
  return LoadedExport(manifest=manifest,
                      image_encoder=load_jax_export(storage.join(export_dir, IMAGE_FILE)),
                      text_encoder=load_jax_export(storage.join(export_dir, TEXT_FILE)),
                      tokenizer=tokenizer)


def export_tf(model: nnx.Module, spec: BatchSpec, text_len: int, text_batch: int,
              out_dir: str) -> str:
  """Writes a TF SavedModel with signatures embed_images and embed_texts (needs TF)."""
  try:
    import tensorflow as tf  # optional: the `tf` extra
    from jax.experimental import jax2tf
  except ImportError:
    raise ImportError("SavedModel export needs TensorFlow: pip install 'navit-clip[tf]'") \
        from None
  image_fn, text_fn, params = _pure_fns(model)
  # TF tracks variables in lists and string-keyed dicts only: keep the leaves in a list.
  leaves, treedef = jax.tree.flatten(params)
  module = tf.Module()
  module.params = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
  tf_image = jax2tf.convert(lambda p, b: image_fn(jax.tree.unflatten(treedef, p), b),
                            with_gradient=False)
  tf_text = jax2tf.convert(lambda p, t: text_fn(jax.tree.unflatten(treedef, p), t),
                           with_gradient=False)
  image_sig = {k: tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=k)
               for k, s in image_input_specs(spec).items()}

  @tf.function(autograph=False, input_signature=[image_sig])
  def embed_images(batch):
    return {"embeddings": tf_image(module.params, batch)}

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec((text_batch, text_len), tf.int32, name="tokens")])
  def embed_texts(tokens):
    return {"embeddings": tf_text(module.params, tokens)}

  module.embed_images, module.embed_texts = embed_images, embed_texts
  path = storage.join(out_dir, SAVED_MODEL_DIR)
  signatures = {"embed_images": embed_images, "embed_texts": embed_texts}
  if storage.is_local(path):
    tf.saved_model.save(module, path, signatures=signatures)
    return path
  with tempfile.TemporaryDirectory() as local:  # TF writes local paths (and gs:// only)
    tf.saved_model.save(module, local, signatures=signatures)
    storage.upload_dir(local, path)
  return path


def export_model(model: nnx.Module, spec: BatchSpec, text_len: int, out_dir: str, *,
                 tf: bool = False, text_batch: int = 64, overwrite: bool = False,
                 tokenizer: Tokenizer | None = None, resolution: str = "",
                 platforms: tuple[str, ...] = PLATFORMS) -> dict:
  """Exports the encoders of a TwoTower `model` into `out_dir` (see the module docstring).

  `tokenizer` (its max_len = `text_len`) is copied into the export; `resolution`, the
  policy the image batches are made with, is recorded in export.json.
  """
  if not hasattr(model, "embed_texts"):
    raise UserError("model export needs a contrastive (two-tower) model; this checkpoint "
                    f"is a {type(model).__name__}")
  if tokenizer is not None and tokenizer.max_len != text_len:
    raise ValueError(f"tokenizer max_len {tokenizer.max_len} differs from text_len {text_len}")
  prepare_out_dir(out_dir, overwrite)
  files = export_jax(model, spec, text_len, out_dir, platforms)
  if tf:
    files.append(export_tf(model, spec, text_len, text_batch, out_dir))
  tokenizer_entry = None
  if tokenizer is not None:
    tokenizer_entry = _copy_tokenizer(tokenizer, out_dir)
    files.append(tokenizer_entry["file"])
  manifest = {
      "platforms": list(platforms),
      "resolution": resolution or None,
      "tokenizer": tokenizer_entry,
      "image_inputs": {k: {"shape": list(s.shape), "dtype": np.dtype(s.dtype).name}
                       for k, s in image_input_specs(spec).items()},
      "text_inputs": {"tokens": {"shape": ["n", text_len], "dtype": "int32"}},
      "saved_model_text_batch": text_batch if tf else None,
      "embedding_dim": int(model.image.width),
      "batch_spec": {"batch_size": spec.batch_size, "seq_len": spec.seq_len,
                     "max_images": spec.max_images, "patch_size": spec.patch_size,
                     "channels": spec.channels},
      "files": [os.path.basename(f) for f in files],
  }
  storage.write_atomic(storage.join(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=2))
  return manifest
