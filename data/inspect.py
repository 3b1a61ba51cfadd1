"""`navit-clip data inspect`: what a source holds, before a long run reads it.

Counts records, usable and unusable ones (per reason, as training would count them),
image formats, and histograms of resolution (geometric-mean side sqrt(h * w)), aspect
ratio (w / h), caption length (words) and captions per image. Every image is fully
decoded (at reduced scale where the format allows) so truncated files are found. Records
without the configured image or caption fields are counted by what they hold instead (their
feature names, their tar members), so that wrong `config.data.example_keys` show.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
import multiprocessing
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from navit_clip.data.captions import CaptionError, choose_caption
from navit_clip.data.counters import HELD_KEY, SKIP_KEY
from navit_clip.data.decode import DecodeError, DecodeLimits
from navit_clip.data.decode import open_image
from navit_clip.data.progress import Progress
from navit_clip.data.work_units import Unit, work_units
from navit_clip.errors import UserError

SIDE_EDGES = (64, 128, 224, 384, 512, 768, 1024, 2048)  # px, sqrt(h * w)
ASPECT_EDGES = (1 / 4, 1 / 2, 3 / 4, 4 / 3, 2, 4)  # w / h
WORD_EDGES = (1, 3, 6, 11, 21, 41, 78)  # caption words


def _bin_labels(edges, fmt) -> list[str]:
  labels = [f"< {fmt(edges[0])}"]
  labels += [f"{fmt(a)} - {fmt(b)}" for a, b in zip(edges, edges[1:])]
  return labels + [f">= {fmt(edges[-1])}"]


@dataclasses.dataclass
class Report:
  """Counts from inspecting some records; `merge` adds another report."""

  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  formats: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  sides: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(SIDE_EDGES) + 1))
  aspects: list[int] = dataclasses.field(
      default_factory=lambda: [0] * (len(ASPECT_EDGES) + 1))
  words: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(WORD_EDGES) + 1))
  captions_per_image: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  # records lacking the configured image or caption, by what they hold (HELD_KEY)
  held: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def merge(self, other: Report) -> None:
    self.counts.update(other.counts)
    self.held.update(other.held)
    self.formats.update(other.formats)
    self.captions_per_image.update(other.captions_per_image)
    for name in ("sides", "aspects", "words"):
      mine, theirs = getattr(self, name), getattr(other, name)
      for i, v in enumerate(theirs):
        mine[i] += v

  def to_dict(self) -> dict[str, Any]:
    return {
        "counts": dict(self.counts),
        "formats": dict(self.formats),
        "side_histogram": dict(zip(_bin_labels(SIDE_EDGES, str), self.sides)),
        "aspect_histogram": dict(zip(_bin_labels(ASPECT_EDGES, lambda x: f"{x:.2f}"),
                                     self.aspects)),
        "caption_words_histogram": dict(zip(_bin_labels(WORD_EDGES, str), self.words)),
        "captions_per_image": {str(k): v for k, v in sorted(self.captions_per_image.items())},
        "without_image_or_caption": dict(self.held.most_common()),
    }

  def format(self) -> str:
    """A human-readable summary."""
    c = self.counts
    lines = [f"records {c['records']}: usable {c['usable']}, "
             f"unusable {c['records'] - c['usable']}"]
    for key in sorted(k for k in c if k.startswith(("skipped/", "noted/"))):
      lines.append(f"  {key:32s} {c[key]}")
    for held, n in self.held.most_common(3):
      lines.append(f"{n} records without the configured image or caption hold {held}")
    lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in self.formats.most_common()))
    d = self.to_dict()
    for title, key in (("resolution sqrt(h*w), px", "side_histogram"),
                       ("aspect ratio w/h", "aspect_histogram"),
                       ("caption length, words", "caption_words_histogram"),
                       ("captions per image", "captions_per_image")):
      hist = d[key]
      total = max(sum(hist.values()), 1)
      lines.append(f"{title}:")
      for label, v in hist.items():
        lines.append(f"  {label:>14s} {v:8d} {'#' * round(40 * v / total)}")
    return "\n".join(lines)


def inspect_record(record: dict[str, Any], report: Report, limits: DecodeLimits) -> None:
  """Adds one record to `report`."""
  report.counts["records"] += 1
  if HELD_KEY in record:
    report.held[record[HELD_KEY]] += 1
  if SKIP_KEY in record:
    report.counts[f"skipped/{record[SKIP_KEY]}"] += 1
    return
  image = record.get("image")
  if image is None:
    report.counts["skipped/missing_image"] += 1
    return
  try:
    if isinstance(image, np.ndarray):
      (h, w), fmt, mislabelled = image.shape[:2], "array", False
    else:
      opened = open_image(bytes(image), limits, record.get("image_format"))
      (h, w), fmt, mislabelled = opened.size_hw, opened.format, opened.mislabelled
      opened.load(draft_hw=(1, 1))
  except DecodeError as e:
    report.counts[f"skipped/{e.reason}"] += 1
    return
  report.formats[fmt] += 1
  if mislabelled:
    report.counts["noted/mislabelled"] += 1
  caption = record.get("caption")
  if caption is not None:
    items = caption if isinstance(caption, (list, tuple)) else [caption]
    report.captions_per_image[len(items)] += 1
    try:
      text, repaired = choose_caption(caption, np.random.default_rng(0))
      if repaired:
        report.counts["noted/caption_repaired"] += 1
      report.words[bisect.bisect_right(WORD_EDGES, len(text.split()))] += 1
    except CaptionError as e:
      report.counts[f"noted/{e.reason}"] += 1
  else:
    report.captions_per_image[0] += 1
  report.counts["usable"] += 1
  report.sides[bisect.bisect_right(SIDE_EDGES, math.sqrt(h * w))] += 1
  report.aspects[bisect.bisect_right(ASPECT_EDGES, w / h)] += 1


def _inspect_into(job: tuple[Unit, int, DecodeLimits], report: Report,
                  on_record: Callable[[], None] = lambda: None) -> Report:
  """Adds the unit's first `limit` records to `report`, calling `on_record` after each."""
  unit, limit, limits = job
  for i, record in enumerate(unit.records()):
    if i >= limit:
      break
    inspect_record(record, report, limits)
    on_record()
  return report


def _inspect_unit(job: tuple[Unit, int, DecodeLimits]) -> Report:
  return _inspect_into(job, Report())


def _progress(units: list[Unit], per_unit: int) -> Progress:
  """Records of known count for random-access units; files done (and records) for streams."""
  if all(u.reader is None for u in units):
    return Progress("data inspect", sum(min(u.stop - u.start, per_unit) for u in units))
  return Progress("data inspect", len(units), "files")


def _show(bar: Progress, report: Report, units_done: int) -> None:
  c = report.counts
  if bar.unit == "files":
    bar.update(units_done, records=c["records"], skipped=c["records"] - c["usable"])
  else:
    bar.update(c["records"], skipped=c["records"] - c["usable"])


def inspect_source(config: ml_collections.ConfigDict, *, limit: int = 0, workers: int = 1
                   ) -> Report:
  """Inspects config.data.source over config.data.train_files, logging its progress.

  Args:
    limit: at most this many records (0 = all), taken evenly from every unit.
    workers: processes.

  Raises:
    UserError: no record read is usable (the report would describe nothing).
  """
  from navit_clip.data.pipeline import decode_limits
  units = work_units(config)
  per_unit = math.ceil(limit / len(units)) if limit else 1 << 62
  jobs = [(u, per_unit, decode_limits(config)) for u in units]
  report, bar = Report(), _progress(units, per_unit)
  if workers > 1 and len(jobs) > 1:
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
      for done, r in enumerate(pool.imap(_inspect_unit, jobs), 1):
        report.merge(r)
        _show(bar, report, done)
  else:
    for done, job in enumerate(jobs):
      _inspect_into(job, report, functools.partial(_show, bar, report, done))
  _show(bar, report, len(jobs))
  bar.close()
  if not report.counts["usable"]:
    reasons = ", ".join(f"{k}: {v}" for k, v in report.counts.most_common()
                        if k.startswith("skipped/")) or "no records at all"
    held = "".join(f"; they hold {h}" for h, _ in report.held.most_common(1))
    raise UserError(f"data inspect: {config.data.source} {config.data.train_files!r} has no "
                    f"usable record in {report.counts['records']} read ({reasons}){held}")
  return report
