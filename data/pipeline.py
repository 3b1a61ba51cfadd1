"""The Grain input pipeline: source -> shuffle -> per-example work -> pack -> batches.

    MapDataset.source(source).seed(s).shuffle().repeat()     global shuffle, new order/epoch
      .map_with_index(Preprocessor)                          decode, resize, patchify, drop,
                                                             tokenize (randomness from (s, i))
      .to_iter_dataset().mp_prefetch(workers)                 worker processes (0 = in process)
    PackedBatchDataset(..., spec)                            packing, in the main process

Packing runs after the workers so that batches do not depend on the worker count, and the
whole iterator state (the parent's position and the packer's pending images) checkpoints.
"""

from __future__ import annotations

import grain
import ml_collections

from navit_clip.data.batch import BatchSpec
from navit_clip.data.demo_source import DemoSource
from navit_clip.data.pack_dataset import PackedBatchDataset
from navit_clip.data.preprocess import Preprocessor
from navit_clip.data.resolution import ResolutionSampler
from navit_clip.data.token_drop import TokenDropper
from navit_clip.sizes import parse_variant
from navit_clip.text.tokenizer import Tokenizer

SOURCES = ("demo",)


def batch_spec(config: ml_collections.ConfigDict) -> BatchSpec:
  """The static shape of the packed batches that `config` trains on."""
  _, patch = parse_variant(config.model.image.variant)
  contrastive = config.task == "contrastive"
  return BatchSpec(batch_size=config.data.batch_size, seq_len=config.data.seq_len,
                   max_images=config.data.max_images, patch_size=patch,
                   channels=config.model.image.channels,
                   text_len=config.model.text.max_len if contrastive else None,
                   num_classes=None if contrastive else config.model.num_classes,
                   multi_label=config.loss.name == "sigmoid_xent")


def make_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of `config.data.source` for `split` ("train" | "eval")."""
  d = config.data
  if d.source == "demo":
    n = d.num_train_examples if split == "train" else d.num_eval_examples
    return DemoSource(split, num_examples=n, seed=d.source_seed)
  raise ValueError(f"config.data.source = {d.source!r}; expected one of {list(SOURCES)}")


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The caption tokenizer of `config.data.tokenizer`, checked against the text tower."""
  tok = config.data.tokenizer
  if not tok.path:
    raise ValueError("config.data.tokenizer.path is empty; the contrastive task needs a "
                     "SentencePiece .model (train one with `navit-clip tokenizer train`)")
  tokenizer = Tokenizer(tok.path, config.model.text.max_len, lowercase=tok.lowercase)
  tokenizer.check_config(config.model.text)
  return tokenizer


def make_preprocessor(config: ml_collections.ConfigDict, *, seed: int,
                      resolution: ml_collections.ConfigDict | None = None,
                      token_drop: bool = True) -> Preprocessor:
  """Per-example work for `config` (resolution defaults to config.data.resolution)."""
  spec = batch_spec(config)
  sampler = ResolutionSampler.from_config(resolution or config.data.resolution,
                                          spec.patch_size, spec.seq_len)
  dropper = (TokenDropper.from_config(config.data.token_drop) if token_drop
             else TokenDropper(kind="none"))
  contrastive = config.task == "contrastive"
  return Preprocessor(
      patch_size=spec.patch_size, sampler=sampler, dropper=dropper, seed=seed,
      tokenizer=make_tokenizer(config) if contrastive else None,
      label_field=None if contrastive else config.data.label_field,
      num_classes=0 if contrastive else config.model.num_classes,
      multi_label=spec.multi_label)


def make_train_dataset(config: ml_collections.ConfigDict) -> grain.IterDataset:
  """Endless packed training batches (host NumPy dicts of `batch_spec(config)`)."""
  d = config.data
  source = make_source(config, "train")
  preprocess = make_preprocessor(config, seed=config.seed)
  ds = (grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
        .map_with_index(preprocess).to_iter_dataset())
  if d.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return PackedBatchDataset(ds, batch_spec(config), packer=d.packer, window=d.pack_window,
                            bins=d.pack_bins)


def make_eval_dataset(config: ml_collections.ConfigDict, source, *, label_field: str,
                      num_classes: int,
                      resolution: ml_collections.ConfigDict | None = None) -> grain.IterDataset:
  """One pass over `source` in order, packed, with int labels from `label_field` per slot.

  No shuffle, no token dropping; `resolution` (default: config.data.resolution) should be
  a deterministic policy such as a patch budget.
  """
  spec = batch_spec(config)
  spec = BatchSpec(batch_size=spec.batch_size, seq_len=spec.seq_len,
                   max_images=spec.max_images, patch_size=spec.patch_size,
                   channels=spec.channels, num_classes=num_classes)
  sampler = ResolutionSampler.from_config(resolution or config.data.resolution,
                                          spec.patch_size, spec.seq_len)
  preprocess = Preprocessor(patch_size=spec.patch_size, sampler=sampler,
                            dropper=TokenDropper(kind="none"), seed=config.seed,
                            label_field=label_field, num_classes=num_classes)
  ds = grain.MapDataset.source(source).map_with_index(preprocess).to_iter_dataset()
  return PackedBatchDataset(ds, spec, packer=config.data.packer,
                            window=config.data.pack_window, bins=config.data.pack_bins)
