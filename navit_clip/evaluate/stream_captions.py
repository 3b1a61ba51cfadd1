"""The captions of a streamed dataset, read in their own pass when first asked for.

A stream's records carry their captions, but the workers that decode the images never
hand them back, so retrieval over a TFRecord or webdataset source reads the files once
more for the captions alone (no image is decoded). Zero-shot never asks, and never pays.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import grain

from navit_clip.data.captions import usable_captions
from navit_clip.data.counters import is_skip


class StreamCaptions(Mapping):
  """example_id -> its usable captions ([] for none), for the records of one stream pass.

  Args:
    stream: a grain.IterDataset of records {"example_id", "caption"?} or skip markers
      (e.g. `navit_clip.data.pipeline.make_stream`), read once on first access.
    name: the dataset, for messages.
    repair: invalid UTF-8 policy of `navit_clip.data.captions` ("replace" or "skip").
  """

  def __init__(self, stream: grain.IterDataset, name: str, repair: str = "replace"):
    self._stream, self._name, self._repair = stream, name, repair
    self._captions: dict[int, list[str]] | None = None

  def _read(self) -> dict[int, list[str]]:
    if self._captions is None:
      captions: dict[int, list[str]] = {}
      for record in self._stream:
        if is_skip(record):
          continue
        example_id = int(record["example_id"])
        if example_id in captions:
          raise ValueError(f"dataset {self._name!r}: example id {example_id} appears twice; "
                           "retrieval needs one id per image")
        captions[example_id] = usable_captions(record.get("caption"), self._repair)
      self._captions = captions
    return self._captions

  def __getitem__(self, example_id: int) -> Sequence[str]:
    return self._read()[example_id]

  def __iter__(self) -> Iterator[int]:
    return iter(self._read())

  def __len__(self) -> int:
    return len(self._read())
