"""The Grain input pipeline: source -> shuffle -> per-example work -> count -> pack.

Random-access sources (demo, ArrayRecord, folders):
    MapDataset.source(source)[process_index::process_count]  this host's share
      .seed(s).shuffle().repeat(num_epochs)                  global shuffle, new order/epoch
      .map_with_index(Preprocessor)                          decode, resize, patchify, drop,
                                                             tokenize (randomness from (s, i))
      .to_iter_dataset().mp_prefetch(workers)                worker processes (0 = in process)
Streamed sources (webdataset tar shards, TFRecord):
    FileStream(this host's files)                            file interleave, new file order
      -> WindowShuffleIterDataset                              each epoch; window shuffle
      -> WorkerStride -> .map(Preprocessor) -> mp_prefetch   every worker reads the records,
                                                             decodes every W-th one
Then, in the main process:
    SkipCountingDataset                                      counts and drops skip markers
    PackedBatchDataset(..., spec)                            packing

Packing and counting run after the workers so that batches and counters do not depend on
the worker count, and the whole iterator state (the parent's position, the counters and the
packer's pending images) checkpoints. A resumed run must use the same worker count.
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections

from navit_clip.data.batch import BatchSpec
from navit_clip.data.counters import SkipCountingDataset
from navit_clip.data.decode import DecodeLimits
from navit_clip.data.sources.demo import DemoSource
from navit_clip.data.pack_dataset import PackedBatchDataset
from navit_clip.data.preprocess import Preprocessor
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.sources.arrayrecord import ArrayRecordSource
from navit_clip.data.sources.tf_example import ExampleKeys
from navit_clip.data.sources.folder import CaptionFolderSource, ClassFolderSource
from navit_clip.data.sources.mixture import parse_mixture
from navit_clip.data.sources.paths import expand_paths
from navit_clip.data.sources.stream import (ID_MIXTURE_SHIFT, FileStream, MixedStream,
                                            WorkerStride)
from navit_clip.data.sources.tfrecord import TFRecordReader
from navit_clip.data.sources.webdataset import TarReader
from navit_clip.data.token_drop import TokenDropper
from navit_clip.variants import parse_variant
from navit_clip.text.tokenizer import Tokenizer

RANDOM_ACCESS = ("demo", "arrayrecord", "folder", "class_folders")
STREAMS = ("webdataset", "tfrecord")
SOURCES = RANDOM_ACCESS + STREAMS + ("mixture",)


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


def example_keys(config: ml_collections.ConfigDict) -> ExampleKeys:
  """Feature names for tf.train.Example based sources (TFRecord, ArrayRecord)."""
  k = config.data.example_keys
  return ExampleKeys(image=k.image, caption=k.caption, example_id=k.example_id,
                     image_format=k.image_format)


def decode_limits(config: ml_collections.ConfigDict) -> DecodeLimits:
  dec = config.data.decode
  return DecodeLimits(max_pixels=dec.max_pixels, min_side=dec.min_side,
                      max_aspect=dec.max_aspect, mislabelled=dec.mislabelled)


def _files(config: ml_collections.ConfigDict, split: str) -> str:
  return config.data.train_files if split == "train" else config.data.eval_files


def make_source(config: ml_collections.ConfigDict, split: str, kind: str | None = None,
                files: str | None = None):
  """A random-access source: of `kind` over `files`, default config.data.source over the
  split's files (config.data.train_files / eval_files; a folder for folder sources)."""
  d = config.data
  kind = d.source if kind is None else kind
  files = _files(config, split) if files is None else files
  if kind == "demo":
    n = d.num_train_examples if split == "train" else d.num_eval_examples
    return DemoSource(split, num_examples=n, seed=d.source_seed)
  if kind == "arrayrecord":
    return ArrayRecordSource(expand_paths(files, what=f"{split} ArrayRecord files"),
                             example_keys(config))
  if kind == "folder":
    return CaptionFolderSource(files)
  if kind == "class_folders":
    return ClassFolderSource(files)
  if kind in STREAMS or kind == "mixture":
    raise ValueError(f"source {kind!r} is not random access; stream it with make_records, "
                     "or convert it to ArrayRecord with `navit-clip data convert`")
  raise ValueError(f"config.data.source = {kind!r}; expected one of {list(SOURCES)}")


def _reader(config: ml_collections.ConfigDict, kind: str):
  """The FileStream reader of a streamed source kind."""
  if kind == "webdataset":
    return TarReader(config.data.max_member_bytes)
  return TFRecordReader(example_keys(config))


def make_stream(config: ml_collections.ConfigDict, kind: str, files: str) -> grain.IterDataset:
  """One ordered pass over the records of streamed `files` (evaluation, export).

  The files in the order `expand_paths` gives, one at a time, each record once: no file
  shuffle, no window shuffle, no repeat. Records without an example id get
  `file << 32 | n` (see navit_clip.data.sources.stream); unreadable ones are skip markers.
  """
  if kind not in STREAMS:
    raise ValueError(f"stream kind {kind!r} is not one of {list(STREAMS)}")
  paths = expand_paths(files, what=f"{kind} files")
  return FileStream(paths, _reader(config, kind), file_ids=range(len(paths)), seed=0,
                    cycle=1, num_epochs=1, shuffle_files=False)


def _file_stream(config: ml_collections.ConfigDict, kind: str, files: str, *, seed: int,
                 num_epochs: int, process_index: int, process_count: int) -> grain.IterDataset:
  d = config.data
  paths = expand_paths(files, what=f"{kind} files")
  ids = list(range(len(paths)))
  paths, ids = paths[process_index::process_count], ids[process_index::process_count]
  if not paths:
    raise ValueError(f"{kind} files {files!r}: {len(ids)} files for {process_count} "
                     "processes; every process needs at least one file")
  ds = FileStream(paths, _reader(config, kind), file_ids=ids, seed=seed,
                  cycle=d.cycle_length, num_epochs=num_epochs)
  if d.shuffle_window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=d.shuffle_window,
                                                     seed=seed)
  return ds


def _random_access(source, *, seed: int, num_epochs: int, shuffle: bool, process_index: int,
                   process_count: int) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  return ds.repeat(num_epochs or None)


class _OffsetIds:
  """Adds `component << ID_MIXTURE_SHIFT` to a record's example id (mixtures)."""

  def __init__(self, component: int):
    self.offset = component << ID_MIXTURE_SHIFT

  def __call__(self, record: dict) -> dict:
    return {**record, "example_id": int(record["example_id"]) + self.offset}


def make_records(config: ml_collections.ConfigDict, *, seed: int, num_epochs: int = 0,
                 process_index: int = 0, process_count: int = 1
                 ) -> grain.MapDataset | grain.IterDataset:
  """This process's training records: config.data.source, or its mixture.

  Returns:
    A MapDataset of records when every source is random access (shuffled globally), else
    an IterDataset of (stream position, record) pairs (`WorkerStride`).
  """
  d = config.data
  if d.source == "mixture":
    components = [(c.kind, c.files, c.weight)
                  for c in parse_mixture(d.mixture, RANDOM_ACCESS + STREAMS)]
  else:
    components = [(d.source, d.train_files, 1.0)]
  shard = dict(process_index=process_index, process_count=process_count)
  if all(kind in RANDOM_ACCESS for kind, _, _ in components):
    parts = [_random_access(make_source(config, "train", kind, files), seed=seed + c,
                            num_epochs=num_epochs, shuffle=True, **shard)
             for c, (kind, files, _) in enumerate(components)]
    if len(parts) == 1:
      return parts[0]
    return grain.MapDataset.mix([p.map(_OffsetIds(c)) for c, p in enumerate(parts)],
                                [w for _, _, w in components])
  streams = [
      _file_stream(config, kind, files, seed=seed + c, num_epochs=num_epochs, **shard)
      if kind in STREAMS else
      _random_access(make_source(config, "train", kind, files), seed=seed + c,
                     num_epochs=num_epochs, shuffle=True, **shard).to_iter_dataset()
      for c, (kind, files, _) in enumerate(components)]
  if len(streams) == 1:
    return WorkerStride(streams[0])
  return WorkerStride(MixedStream(streams, [w for _, _, w in components], seed=seed))


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
      multi_label=spec.multi_label, limits=decode_limits(config),
      draft=config.data.decode.draft, caption_repair=config.data.caption_repair)


def _count_skips(ds: grain.IterDataset, config: ml_collections.ConfigDict,
                 name: str) -> SkipCountingDataset:
  d = config.data
  return SkipCountingDataset(ds, source=name, max_bad_fraction=d.max_bad_fraction,
                             min_records=d.bad_check_min_records)


def _source_name(config: ml_collections.ConfigDict) -> str:
  d = config.data
  if d.source == "mixture":
    return f"mixture {d.mixture!r}"
  return f"{d.source} {d.train_files!r}" if d.source != "demo" else "demo"


def make_train_dataset(config: ml_collections.ConfigDict, *,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """Packed training batches (host NumPy dicts of `batch_spec(config)`) of this process.

  When the data is sharded by process, each process packs its own B / process_count rows
  (navit_clip.sharding.global_batch assembles the global batch on the devices).

  Endless unless config.data.num_epochs > 0. `process_index` / `process_count` default to
  jax.process_index() / jax.process_count() when config.data.shard_by_process, else 0 / 1.
  `navit_clip.data.counters.data_counters(iterator)` reads the skip counters of an iterator.
  """
  d = config.data
  if process_index is None or process_count is None:
    if d.shard_by_process:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    else:
      process_index, process_count = 0, 1
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  records = make_records(config, seed=config.seed, num_epochs=d.num_epochs,
                         process_index=process_index, process_count=process_count)
  spec = batch_spec(config)
  if process_count > 1 and d.shard_by_process:
    if spec.batch_size % process_count:
      raise ValueError(f"config.data.batch_size = {spec.batch_size} does not split over "
                       f"{process_count} processes")
    spec = dataclasses.replace(spec, batch_size=spec.batch_size // process_count)
  preprocess = make_preprocessor(config, seed=config.seed)
  if isinstance(records, grain.MapDataset):
    ds = records.map_with_index(preprocess).to_iter_dataset()
  else:
    ds = records.map(preprocess.on_pair)
  if d.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return PackedBatchDataset(_count_skips(ds, config, _source_name(config)), spec,
                            packer=d.packer, window=d.pack_window, bins=d.pack_bins)
