"""Images -> packed inference batches, with every unusable record listed, never dropped silently.

    source[start:stop]                     a random-access source, or
    WorkerStride(first `stop` of stream)   a streamed one (TFRecord, webdataset), read once
      --Grain map: decode, resize by policy, patchify (workers)-->
    skip markers split off (main process) --> window best-fit packing --> batches

One pass, in order, no shuffle, no token dropping. A stream is read by every worker, each
decoding its share of the positions (see navit_clip.data.sources.stream), so the records
and their order do not depend on the worker count. The packer fills rows from a window of
pending images, so images leave in a different order than they came: consumers key the
embeddings by `example_id` (`embed.embed_packed` sorts by it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import grain
import numpy as np

from navit_clip.data.batch import BatchSpec
from navit_clip.data.counters import NOTES_KEY, SKIP_KEY, is_skip
from navit_clip.data.decode import DecodeLimits
from navit_clip.data.pack import pack
from navit_clip.data.pipeline import read_threads
from navit_clip.data.preprocess import Preprocessor
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.sources.stream import WorkerStride
from navit_clip.data.token_drop import TokenDropper


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record that could not be embedded: its example id and the reason."""

  example_id: int
  reason: str


def _preprocessed(source, preprocess: Preprocessor, start: int,
                  stop: int | None) -> grain.IterDataset:
  """Records `start..stop` of `source` (random access or a stream), preprocessed (random
  access: on one thread a core, `read_threads`)."""
  if not isinstance(source, grain.IterDataset):
    return grain.MapDataset.source(source)[start:stop].map_with_index(
        preprocess).to_iter_dataset(grain.ReadOptions(num_threads=read_threads(0)))
  if start:
    raise ValueError(f"a streamed source is read from its first record; got start={start} "
                     "(convert it to ArrayRecord with `navit-clip data convert` for ranges)")
  if stop is not None:
    source = grain.experimental.LimitIterDataset(source, stop)
  return WorkerStride(source).map(preprocess.on_pair)


def inference_batches(source, spec: BatchSpec, sampler: ResolutionSampler, *,
                      label_field: str | None = None, start: int = 0, stop: int | None = None,
                      num_workers: int = 0, limits: DecodeLimits = DecodeLimits(),
                      resample: str = "bilinear", draft: bool = True,
                      skipped: list[Skipped] | None = None,
                      on_records: Callable[[int], None] | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
  """Packed batches of `spec` over records `start..stop` of `source`.

  Args:
    source: random access (len() and [i]), or a grain.IterDataset streaming one pass (e.g.
      `navit_clip.data.pipeline.make_stream`), of records {"image": encoded bytes or uint8
      [H, W, C], "example_id": int, and `label_field` if given} or skip markers
      (navit_clip.data.counters).
    spec: the batch shape; needs num_classes when `label_field` is given (labels
      multi-hot float32 [B, M, K] when spec.multi_label, else int32 [B, M]).
    sampler: the resolution policy's sampler (see `policy.ResolutionPolicy.sampler`).
    label_field: record field copied to int32 "labels" [B, M].
    start, stop: the record range (stop None = the end); a stream starts at 0.
    num_workers: Grain worker processes for decoding (0 = in this process).
    limits: what the decoder refuses (see navit_clip.data.decode).
    resample, draft: the resize filter and whether JPEGs may be decoded at reduced scale
      (the policy's `resample` and `draft`).
    skipped: unusable records are appended here (and never packed).
    on_records: called with the number of records consumed so far (a progress hook).

  Yields:
    host batches of `spec` (the last one padded); every usable record appears exactly once.
  """
  if label_field is not None and spec.num_classes is None:
    raise ValueError(f"label_field {label_field!r} needs a BatchSpec with num_classes")
  preprocess = Preprocessor(patch_size=spec.patch_size, sampler=sampler,
                            dropper=TokenDropper(kind="none"), seed=0,
                            label_field=label_field, num_classes=spec.num_classes or 0,
                            multi_label=spec.multi_label, limits=limits, draft=draft,
                            resample=resample)
  ds = _preprocessed(source, preprocess, start, stop)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))

  def usable() -> Iterator[dict]:
    for consumed, element in enumerate(ds, 1):
      if on_records is not None:
        on_records(consumed)
      if is_skip(element):
        if skipped is not None:
          skipped.append(Skipped(int(element["example_id"]), str(element[SKIP_KEY])))
        continue
      element.pop(NOTES_KEY, None)
      yield element

  yield from pack(usable(), spec, "window_best_fit")
