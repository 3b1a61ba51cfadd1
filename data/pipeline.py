"""The Grain input pipeline: source -> shuffle -> per-example work -> count -> pack.

Random-access sources (demo, ArrayRecord, folders):
    MapDataset.source(source)[process_index::process_count]  this host's share
      .seed(s).shuffle().repeat(num_epochs)                  global shuffle, new order/epoch
      .map_with_index(Preprocessor)                          decode, resize, patchify, drop,
                                                             tokenize (randomness from (s, i))
      .to_iter_dataset().mp_prefetch(workers)                worker processes (0 = in process)
    with workers: .batch(TRANSFER_GROUP) before the work,    a group of examples a transfer
      UngroupDataset after mp_prefetch                       (pack_dataset, "Transfer")
Streamed sources (webdataset tar shards, TFRecord):
    FileStream(this host's files)                            file interleave, new file order
      -> WindowShuffleIterDataset                              each epoch; window shuffle
      -> WorkerStride -> .map(Preprocessor) -> mp_prefetch   worker w of W reads files
                                                             w::W of each epoch's order
                                                             (data.stream_split "files"), or
                                                             every record and decodes every
                                                             W-th group ("records"); sends a
                                                             group of TRANSFER_GROUP at once
Then, in the main process:
    SkipCountingDataset                                      counts and drops skip markers
    PackedBatchDataset(..., spec)                            packing

Packing and counting run after the workers so that batches and counters do not depend on
the worker count, and the whole iterator state (the parent's position, the counters and the
packer's pending images) checkpoints. A resumed run must use the same worker count.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import grain
import ml_collections
import numpy as np

from navit_clip.choices import check_choice, check_range, naming
from navit_clip.data.batch import BatchSpec
from navit_clip.data.captions import REPAIR_POLICIES
from navit_clip.data.counters import SkipCountingDataset
from navit_clip.data.decode import DecodeLimits
from navit_clip.data.decode import check_config as check_decode
from navit_clip.data.sources.demo import DemoSource
from navit_clip.data.sources.study_shapes import StudyShapesSource
from navit_clip.data.pack_dataset import (PACKERS, TRANSFER_GROUP, PackedBatchDataset,
                                          PreprocessGroup, UngroupDataset)
from navit_clip.data.preprocess import Preprocessor
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.resolution_sampling import check_config as check_resolution
from navit_clip.data.sources.arrayrecord import ArrayRecordSource
from navit_clip.data.sources.tf_example import ExampleKeys
from navit_clip.data.sources.folder import CaptionFolderSource, ClassFolderSource, CsvLayout
from navit_clip.data.sources.folder import check_config as check_folder
from navit_clip.data.sources.mixture import parse_mixture
from navit_clip.data.sources.paths import expand_paths
from navit_clip.data.sources.stream import (SPLITS, FileStream, MixedStream, WorkerStride,
                                            mixture_id)
from navit_clip.data.sources.tfrecord import TFRecordReader
from navit_clip.data.sources.webdataset import TarReader
from navit_clip.data.token_drop import TokenDropper
from navit_clip.data.token_drop import check_config as check_token_drop
from navit_clip.data.workers import WorkerStartShield, init_worker
from navit_clip.variants import parse_variant
from navit_clip.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUILT_IN = ("demo", "study_shapes")  # synthetic sources: no files, sizes from config.data
RANDOM_ACCESS = (*BUILT_IN, "arrayrecord", "folder", "class_folders")
STREAMS = ("webdataset", "tfrecord")
SOURCES = RANDOM_ACCESS + STREAMS + ("mixture",)
SHRINK_WARN_SHARE = 0.25  # warn at start when a config shrinks more of its images than this


def check_config(d: ml_collections.ConfigDict) -> None:
  """Checks config.data: the batch shape, the source and its reading, decoding, per-example
  work (resolution, token dropping; checked by the modules that read them) and packing.

  Raises:
    ValueError: naming the key ("config.data.source = ...") and what it must be.
  """
  check_range("config.data.batch_size", d.batch_size, 1)
  check_range("config.data.seq_len", d.seq_len, 1)
  if not 1 <= d.max_images <= d.seq_len:
    raise ValueError(f"config.data.max_images = {d.max_images} must be in [1, "
                     f"config.data.seq_len = {d.seq_len}]")
  _check_source(d)
  check_decode(d.decode)
  check_resolution(d.resolution)
  check_token_drop(d.token_drop)
  check_choice("config.data.packer", d.packer, PACKERS)
  check_range("config.data.tokenizer.pad_id", d.tokenizer.pad_id, -1)
  check_range("config.data.pack_window", d.pack_window, 1)
  check_range("config.data.pack_bins", d.pack_bins, 1)


def _check_source(d: ml_collections.ConfigDict) -> None:
  """Checks the keys of config.data that choose and read the training records."""
  check_choice("config.data.source", d.source, SOURCES)
  if d.source == "mixture":
    with naming("config.data.mixture", d.mixture):
      parse_mixture(d.mixture, RANDOM_ACCESS + STREAMS)
  elif d.source not in BUILT_IN and not d.train_files:
    raise ValueError(f"config.data.source = {d.source!r} needs config.data.train_files")
  check_folder(d)
  check_choice("config.data.caption_repair", d.caption_repair, REPAIR_POLICIES)
  check_choice("config.data.stream_split", d.stream_split, ("auto", *SPLITS))
  for name in ("num_epochs", "num_workers", "read_threads", "bad_check_min_records"):
    check_range(f"config.data.{name}", d[name], 0)
  for name in ("cycle_length", "shuffle_window", "max_member_bytes"):
    check_range(f"config.data.{name}", d[name], 1)
  check_range("config.data.max_bad_fraction", d.max_bad_fraction, 0.0, 1.0, low_open=True)


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
  if kind == "study_shapes":
    n = d.num_train_examples if split == "train" else d.num_eval_examples
    return StudyShapesSource(split, num_examples=n, seed=d.source_seed)
  if kind == "arrayrecord":
    return ArrayRecordSource(expand_paths(files, what=f"{split} ArrayRecord files"),
                             example_keys(config))
  if kind == "folder":
    return CaptionFolderSource(files, d.max_member_bytes, csv_layout=CsvLayout.from_config(d),
                               image_root=d.image_root)
  if kind == "class_folders":
    return ClassFolderSource(files, d.max_member_bytes)
  if kind in STREAMS or kind == "mixture":
    raise ValueError(f"source {kind!r} is not random access; stream it with make_records, "
                     "or convert it to ArrayRecord with `navit-clip data convert`")
  raise ValueError(f"config.data.source = {kind!r}; expected one of {list(SOURCES)}")


def _reader(config: ml_collections.ConfigDict, kind: str):
  """The FileStream reader of a streamed source kind."""
  if kind == "webdataset":
    return TarReader(config.data.max_member_bytes)
  return TFRecordReader(example_keys(config), config.data.max_member_bytes)


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
                    cycle=1, num_epochs=1, shuffle_files=False, name=f"{kind} {files!r}")


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
                  cycle=d.cycle_length, num_epochs=num_epochs, name=f"{kind} {files!r}")
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
  """Makes a record's example id `mixture_id(component, id)` (mixtures)."""

  def __init__(self, component: int):
    self.component = component

  def __call__(self, record: dict) -> dict:
    return {**record, "example_id": mixture_id(self.component, record["example_id"])}


def process_seed(seed: int, process_index: int) -> int:
  """The seed of one process's data (shuffles, resolutions, drop rates, captions).

  Process 0 uses `seed` itself (a one-process run is process 0); process p > 0 a 31-bit
  seed mixed from (seed, p) by np.random.SeedSequence, unrelated to any other process's
  (Grain offsets shuffle seeds by the epoch and window index, so seed + p would repeat
  process 0's orders one epoch or window later).
  """
  if process_index == 0:
    return seed
  return int(np.random.SeedSequence((seed, process_index)).generate_state(1)[0] >> 1)


def make_records(config: ml_collections.ConfigDict, *, seed: int, num_epochs: int = 0,
                 process_index: int = 0, process_count: int = 1
                 ) -> grain.MapDataset | grain.IterDataset:
  """This process's training records: config.data.source, or its mixture.

  `seed` is the run's seed; the shuffles of process `process_index` draw from
  `process_seed(seed, process_index)`, so processes read their shares in unrelated orders.

  Returns:
    A MapDataset of records when every source is random access (shuffled globally), else
    an IterDataset of (stream position, record) pairs (`WorkerStride`).
  """
  d = config.data
  seed = process_seed(seed, process_index)
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
  tokenizer = Tokenizer(tok.path, config.model.text.max_len, lowercase=tok.lowercase,
                        pad_id=None if tok.pad_id < 0 else tok.pad_id)
  tokenizer.check_config(config.model.text)
  return tokenizer


def make_preprocessor(config: ml_collections.ConfigDict, *, seed: int,
                      resolution: ml_collections.ConfigDict | None = None,
                      token_drop: bool = True, process_index: int = 0,
                      process_count: int = 1) -> Preprocessor:
  """Per-example work for `config` (resolution defaults to config.data.resolution).

  `seed` is the run's seed; process `process_index` of `process_count` draws from
  `process_seed(seed, process_index)` and counts the run's images for the drop schedule.
  """
  spec = batch_spec(config)
  sampler = ResolutionSampler.from_config(resolution or config.data.resolution,
                                          spec.patch_size, spec.seq_len)
  dropper = (TokenDropper.from_config(config.data.token_drop) if token_drop
             else TokenDropper(kind="none"))
  contrastive = config.task == "contrastive"
  return Preprocessor(
      patch_size=spec.patch_size, sampler=sampler, dropper=dropper,
      seed=process_seed(seed, process_index), process_index=process_index,
      process_count=process_count,
      tokenizer=make_tokenizer(config) if contrastive else None,
      label_field=None if contrastive else config.data.label_field,
      num_classes=0 if contrastive else config.model.num_classes,
      multi_label=spec.multi_label, limits=decode_limits(config),
      draft=config.data.decode.draft, decoder=config.data.decode.decoder,
      caption_repair=config.data.caption_repair)


def shrink_share(config: ml_collections.ConfigDict, num_draws: int = 2000) -> float:
  """The estimated share of training images that `config` shrinks to fit data.seq_len.

  Sampled from config.data.resolution for an image at its max side (`num_draws` draws):
  a share above a few percent means the sizes bunch up at the row length instead of
  following the configured distribution (see `ResolutionSampler.sample`).
  """
  spec = batch_spec(config)
  sampler = ResolutionSampler.from_config(config.data.resolution, spec.patch_size,
                                          spec.seq_len)
  return sampler.shrink_share(num_draws)


def warn_if_shrinking(config: ml_collections.ConfigDict) -> float:
  """Logs a warning when `shrink_share(config)` exceeds SHRINK_WARN_SHARE; returns it."""
  share = shrink_share(config)
  if share > SHRINK_WARN_SHARE:
    spec, res = batch_spec(config), config.data.resolution
    fits = int(spec.seq_len ** 0.5 * spec.patch_size)
    log.warning(
        "config.data.resolution (%s, sides %g-%g px) shrinks about %.0f%% of the images "
        "to fit config.data.seq_len = %d patches of %d px (a square of about %d px): "
        "lower max_side or raise seq_len", res.kind, res.min_side, res.max_side,
        100 * share, spec.seq_len, spec.patch_size, fits)
  return share


def _count_skips(ds: grain.IterDataset, config: ml_collections.ConfigDict,
                 name: str) -> SkipCountingDataset:
  d = config.data
  return SkipCountingDataset(ds, source=name, max_bad_fraction=d.max_bad_fraction,
                             min_records=d.bad_check_min_records)


def _source_name(config: ml_collections.ConfigDict) -> str:
  d = config.data
  if d.source == "mixture":
    return f"mixture {d.mixture!r}"
  return f"{d.source} {d.train_files!r}" if d.source not in BUILT_IN else d.source


def read_threads(requested: int) -> int:
  """The threads that make examples in this process: `requested` (config.data.read_threads),
  or for 0 the host's cores, at most Grain's default of 16. More threads than cores only
  fight over the GIL for the Python part of the work: on 2 cores the demo's in-process
  pipeline took 2070 us of CPU an image with 16 threads, 1220 with 2, 1096 with 1."""
  return requested or min(os.cpu_count() or 1, 16)


def stream_split(records: WorkerStride, requested: str, num_workers: int) -> str:
  """How `num_workers` workers share streamed `records` (config.data.stream_split):
  "auto" is "files" when every record comes from files and every file stream has at least
  one file a worker, else "records".

  Raises:
    ValueError: "files" was asked for where it cannot serve.
  """
  streams = records.file_streams()
  possible = streams is not None and all(len(s.paths) >= num_workers for s in streams)
  if requested == "files" and not possible:
    why = ("a random-access component of the mixture is not read by files" if streams is None
           else f"a stream has {min(len(s.paths) for s in streams)} files for {num_workers} "
           "workers")
    raise ValueError(f"config.data.stream_split = 'files': {why}; use 'records' or 'auto'")
  if requested == "auto":
    return "files" if possible else "records"
  return requested


def _examples(records: grain.MapDataset | grain.IterDataset, preprocess: Preprocessor,
              num_workers: int, threads: int, split: str = "auto") -> grain.IterDataset:
  """The per-image examples of `records`, made in `num_workers` processes (0 = this one,
  on `threads` threads).

  Workers take records TRANSFER_GROUP at a time (random access: two groups in flight, the
  reads of one overlapping the decoding of the other, where Grain's default of 16 threads
  and 500 elements would hold 500 groups; streamed: a worker's share is whole groups of
  consecutive positions, `WorkerStride.in_groups`, shared by `split`: see `stream_split`),
  and send each group as one element, which this process ungroups
  (navit_clip.data.pack_dataset, "Transfer"): the same examples, in the same order.
  """
  grouped = num_workers > 0
  if grouped and isinstance(records, grain.MapDataset):
    ds = (records.batch(TRANSFER_GROUP, batch_fn=list)
          .map_with_index(PreprocessGroup(preprocess))
          .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
  elif grouped:
    ds = (records.in_groups(TRANSFER_GROUP, stream_split(records, split, num_workers))
          .map(PreprocessGroup(preprocess).on_pairs))
  elif isinstance(records, grain.MapDataset):
    ds = records.map_with_index(preprocess).to_iter_dataset(
        grain.ReadOptions(num_threads=threads))
  else:
    ds = records.map(preprocess.on_pair)
  if num_workers > 0:  # workers leave SIGINT / SIGTERM to this process, and end with it
    ds = WorkerStartShield(ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=init_worker))
  return UngroupDataset(ds) if grouped else ds


def make_train_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """Packed training batches (host NumPy dicts of `batch_spec(config)`) of this process.

  When the data is sharded by process, each process packs its own B / process_count rows
  (navit_clip.sharding.global_batch assembles the global batch on the devices).

  Endless unless config.data.num_epochs > 0. `process_index` of `process_count` is this
  process's share of the records (the trainer passes `navit_clip.distributed.data_share`:
  the JAX process when config.data.shard_by_process, else 0 of 1); the data layer knows no
  JAX. `navit_clip.data.counters.data_counters(iterator)` reads the skip counters of an
  iterator.
  """
  d = config.data
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  warn_if_shrinking(config)
  records = make_records(config, seed=config.seed, num_epochs=d.num_epochs,
                         process_index=process_index, process_count=process_count)
  spec = batch_spec(config)
  if process_count > 1 and d.shard_by_process:
    if spec.batch_size % process_count:
      raise ValueError(f"config.data.batch_size = {spec.batch_size} does not split over "
                       f"{process_count} processes")
    spec = dataclasses.replace(spec, batch_size=spec.batch_size // process_count)
  preprocess = make_preprocessor(config, seed=config.seed, process_index=process_index,
                                 process_count=process_count)
  ds = _examples(records, preprocess, d.num_workers, read_threads(d.read_threads),
                 d.stream_split)
  return PackedBatchDataset(_count_skips(ds, config, _source_name(config)), spec,
                            packer=d.packer, window=d.pack_window, bins=d.pack_bins)
