"""Per-example work: one source record -> one packable example, or a skip marker.

Runs in Grain worker processes (so it is picklable and import-safe). For record i of the
stream, with randomness drawn from (seed, i) only, so the result does not depend on worker
count or order (each process of a multi-host run has a seed of its own,
`navit_clip.data.pipeline.process_seed`):

  image (encoded bytes, or uint8 [H, W, C]) --header: size, orientation, limits-->
  resolution sampling (aspect kept, patch-rounded, fits L) --> decode (a JPEG at reduced
  scale when much larger than the target) --> resize --> patchify uint8 [n, P*P*C],
  positions int32 [n, 2], grid_hw int32 [2] --> token dropping (rate per image)
  --> caption (one of several, drawn from (seed, i, 1)) --> tokens int32 [T] / labels

A record that cannot be used (bad bytes, no usable caption, a bad label) becomes a skip
marker naming the reason (`navit_clip.data.counters`), keeping what the record held when
it lacked the configured fields (HELD_KEY); markers from the source pass through.
An image whose sampled size overflows the sequence and is shrunk to fit carries the note
"shrunk_to_fit", so the counters count them (`shrunk_share`).
Counting and removing them happens in the main process, so the counts are exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from navit_clip.data.captions import CaptionError, choose_caption
from navit_clip.data.counters import HELD_KEY, NOTES_KEY, is_skip, skip_marker
from navit_clip.data.decode import DecodeError, DecodeLimits, open_image
from navit_clip.data.patchify import patchify, resize
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.token_drop import TokenDropper, kept_tokens
from navit_clip.text.tokenizer import Tokenizer

_CAPTION_STREAM = 1  # the caption choice draws from (seed, index, _CAPTION_STREAM)
SHRUNK_NOTE = "shrunk_to_fit"  # the note of an image shrunk to the sequence length


def shrunk_share(counters: dict[str, int]) -> float:
  """The share of the used images that were shrunk to fit the sequence length.

  Args:
    counters: `navit_clip.data.counters.data_counters(iterator)` of a training iterator
      (records, skipped, and "noted/shrunk_to_fit" once an image was shrunk).

  Returns:
    shrunk / (records - skipped) since the start of the run, 0.0 before any image.
  """
  used = counters.get("records", 0) - counters.get("skipped", 0)
  return counters.get(f"noted/{SHRUNK_NOTE}", 0) / used if used > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """Turns a record {"image", "example_id", "caption"?, label fields?} into an example.

  Args:
    patch_size: P.
    sampler: target size per image (its max_patches is the sequence length L).
    dropper: token drop rate per image.
    seed: the stream's seed; record i draws from np.random.default_rng((seed, i)).
    process_index / process_count: this process of the run; its record i is image
      i * process_count + process_index of the run, the clock of the token-drop schedule.
    tokenizer: encodes the chosen caption into "text_tokens" [T] (contrastive mode), or None.
    label_field: record field copied to "labels" (classification mode), or None.
    num_classes / multi_label: labels become int32 scalars, or float32 multi-hot [K] when
      `multi_label` (the record then holds a list of class indices).
    limits: what the decoder refuses (bombs, tiny images, extreme aspects, mislabels).
    draft: decode JPEGs at reduced scale when the target is at most half their size.
    decoder: "auto" (libjpeg-turbo for RGB and grayscale JPEGs) or "pil" (see
      navit_clip.data.decode).
    resample: the resize filter ("bilinear" or "bicubic", see `patchify.resize`). A target
      side that is not a multiple of the patch size loses its last rows / columns.
    caption_repair: "replace" invalid UTF-8 (noted) or "skip" the record.

  Records: "image" is encoded bytes (any format of navit_clip.data.decode.FORMATS, with an
  optional "image_format" naming the declared format) or a decoded uint8 [H, W, C] array;
  "caption" is a str, bytes or a list of them; "example_id" an int.
  """

  patch_size: int
  sampler: ResolutionSampler
  dropper: TokenDropper
  seed: int
  process_index: int = 0
  process_count: int = 1
  tokenizer: Tokenizer | None = None
  label_field: str | None = None
  num_classes: int = 0
  multi_label: bool = False
  limits: DecodeLimits = DecodeLimits()
  draft: bool = True
  decoder: str = "auto"
  caption_repair: str = "replace"
  resample: str = "bilinear"

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
    """Record number `index` of the stream -> packable example or skip marker."""
    if is_skip(record):
      return record
    example_id = int(record.get("example_id", index))
    notes = []
    text_tokens = labels = None
    try:
      if self.tokenizer is not None:
        value = record.get("caption")
        # only a choice among several captions draws (a generator costs ~30 us to make)
        several = isinstance(value, (list, tuple, np.ndarray)) and len(value) > 1
        caption_rng = (np.random.default_rng((self.seed, index, _CAPTION_STREAM))
                       if several else None)
        caption, repaired = choose_caption(value, caption_rng, self.caption_repair)
        if repaired:
          notes.append("caption_repaired")
        text_tokens = self.tokenizer.encode([caption])[0]
      if self.label_field is not None:
        labels = self._labels(record.get(self.label_field))
        if labels is None:
          return skip_marker("bad_label", example_id, record.get(HELD_KEY))
      rng = np.random.default_rng((self.seed, index))
      image = record.get("image")
      if image is None:
        return skip_marker("missing_image", example_id, record.get(HELD_KEY))
      if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
          raise ValueError(f"record {example_id}: a decoded 'image' must be uint8 "
                           f"[H, W, C], got {image.dtype}{list(image.shape)}")
        h, w, shrunk = self.sampler.sample(rng, image.shape[0], image.shape[1])
      else:
        opened = open_image(bytes(image), self.limits, record.get("image_format"),
                            self.decoder)
        if opened.mislabelled:
          notes.append("mislabelled")
        h, w, shrunk = self.sampler.sample(rng, *opened.size_hw)
        image = opened.load((h, w) if self.draft else None)
      if shrunk:
        notes.append(SHRUNK_NOTE)
    except (DecodeError, CaptionError) as e:
      return skip_marker(e.reason, example_id, record.get(HELD_KEY))
    p = self.patch_size
    image = resize(image, (h, w), self.resample)[:h - h % p, :w - w % p]
    n = (image.shape[0] // p) * (image.shape[1] // p)
    images_seen = index * self.process_count + self.process_index
    rate = self.dropper.sample_rate(rng, n, images_seen=images_seen)
    # the kept patches only are copied out of the image (drop_tokens' draws and result)
    keep = kept_tokens(rng, n, rate) if rate > 0.0 else None
    patches, positions, grid_hw = patchify(image, p, keep)
    out = {"patches": patches, "positions": positions, "grid_hw": grid_hw,
           "example_id": np.int64(example_id)}
    if text_tokens is not None:
      out["text_tokens"] = text_tokens
    if labels is not None:
      out["labels"] = labels
    if notes:
      out[NOTES_KEY] = tuple(notes)
    return out

  def on_pair(self, pair: tuple[int, dict[str, Any]]) -> dict[str, Any]:
    """`self(index, record)` for streams that carry their position: (index, record)."""
    return self(*pair)

  def _labels(self, value) -> np.ndarray | None:
    """int32 scalar or float32 multi-hot [K]; None if missing or out of [0, K)."""
    if value is None:
      return None
    indices = np.asarray(value).reshape(-1)
    if indices.dtype.kind not in "iu" or np.any(indices < 0) or np.any(
        indices >= self.num_classes):
      return None
    if not self.multi_label:
      return np.int32(indices[0]) if indices.size == 1 else None
    multi_hot = np.zeros((self.num_classes,), np.float32)
    multi_hot[indices] = 1.0
    return multi_hot
