"""`navit-clip data convert`: any source -> ArrayRecord shards of tf.train.Example.

One output shard per unit of work (an input file of a streamed source, or about
`records_per_shard` records of a random-access one), written by `workers` processes. Each
shard is written to a temporary name and renamed when complete (to an object store,
s3:// or gs://, through the local cache and uploaded whole), so an interrupted
conversion resumes by skipping the shards that exist; a shard that fails leaves no
temporary file (nor does a killed one, after the next run). Records keep their encoded
image bytes (decoded arrays, as from the demo source, are stored as PNG), their captions,
example id, declared format and numeric fields; skip markers are counted, not written.
Captions follow training's rules (navit_clip.data.captions): entries that are not text or
are empty are dropped, and a record whose caption field has no usable entry is skipped
and counted under the reason training would give ("empty_caption", ...), as is a record
whose fields cannot be encoded ("unencodable_record").

Output records use the default feature keys (navit_clip.data.sources.tf_example), so
config.data.source = "arrayrecord" with train_files = "OUT/*.array_record" reads them.
"""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from navit_clip import storage
from navit_clip.data.captions import CaptionError, choose_caption, usable_entries
from navit_clip.data.counters import SKIP_KEY
from navit_clip.data.progress import Progress
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.data.work_units import Unit, work_units

log = logging.getLogger(__name__)

_RESERVED = ("image", "caption", "example_id", "image_format")
_ANY_CHOICE = np.random.default_rng(0)  # choose_caption only checks here; the pick is unused


class UnencodableRecord(ValueError):
  """A record field that has no Example encoding."""


def _caption_feature(caption) -> list[bytes]:
  """A record's "caption" field -> the bytes of its usable entries (str as UTF-8).

  Raises:
    CaptionError: no usable entry; its reason is the one training would count.
  """
  choose_caption(caption, _ANY_CHOICE)
  return [c.encode("utf-8", errors="surrogateescape") if isinstance(c, str) else bytes(c)
          for c in usable_entries(caption)]


def record_to_example(record: dict[str, Any]) -> bytes:
  """A record of the common schema -> serialized Example with the default feature keys.

  Raises:
    CaptionError: the record has a caption field without a usable caption.
    UnencodableRecord: a field that no Example feature can hold.
  """
  image = record["image"]
  if isinstance(image, np.ndarray):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    image, fmt = buf.getvalue(), "png"
  else:
    fmt = record.get("image_format") or ""
    fmt = fmt.rsplit(".", 1)[-1].lower()
  features: dict[str, Any] = {"image/encoded": bytes(image),
                              "example_id": int(record["example_id"])}
  if fmt:
    features["image/format"] = fmt
  if record.get("caption") is not None:
    features["caption"] = _caption_feature(record["caption"])
  for name, value in record.items():
    if name in _RESERVED:
      continue
    try:
      values = np.asarray(value).reshape(-1)
    except ValueError as e:  # ragged lists
      raise UnencodableRecord(f"field {name!r}: {e}") from None
    if values.dtype.kind in "iub":
      if values.dtype == np.uint64 and values.size and int(values.max()) >= 1 << 63:
        raise UnencodableRecord(f"field {name!r}: values outside int64")
      features[name] = [int(v) for v in values]
    elif values.dtype.kind == "f":
      features[name] = [float(v) for v in values]
  return encode_example(features)


def shard_path(out_dir: str, index: int, count: int, prefix: str = "data") -> str:
  return storage.join(out_dir, f"{prefix}-{index:05d}-of-{count:05d}.array_record")


def _local_target(path: str) -> str:
  """Where shard `path` is written: `path` itself, or for a URL a file of the local cache
  that is uploaded once complete (the ArrayRecord writer writes local files only)."""
  if storage.is_local(path):
    return path
  return os.path.join(storage.cache_root(), "convert", f"{storage.url_digest(path)}.array_record")


def _write_records(unit: Unit, writer) -> dict[str, int]:
  """Writes the unit's usable records; returns its counts."""
  counts: collections.Counter[str] = collections.Counter()
  for record in unit.records():
    counts["records"] += 1
    if SKIP_KEY in record:
      counts[f"skipped/{record[SKIP_KEY]}"] += 1
      continue
    if "image" not in record:
      counts["skipped/missing_image"] += 1
      continue
    try:
      example = record_to_example(record)
    except CaptionError as e:
      counts[f"skipped/{e.reason}"] += 1
      continue
    except (UnencodableRecord, TypeError, OverflowError) as e:
      log.warning("record %s: %s; skipped", record.get("example_id"), e)
      counts["skipped/unencodable_record"] += 1
      continue
    writer.write(example)
    counts["written"] += 1
  return dict(counts)


def _convert_unit(job: tuple[Unit, str]) -> dict[str, int]:
  """Writes one unit to `path` (via a temporary file, removed if anything fails; a URL
  via the local cache, uploaded whole); returns its counts."""
  from array_record.python.array_record_module import ArrayRecordWriter
  unit, path = job
  local = _local_target(path)
  os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
  tmp = f"{local}.tmp-{os.getpid()}"
  try:
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
      counts = _write_records(unit, writer)
    finally:
      writer.close()
    if local == path:
      os.replace(tmp, path)
    else:
      storage.put_file(tmp, path)  # an object appears whole or not at all
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return counts


def _remove_stale_temporaries(paths: list[str]) -> None:
  """Removes the temporary files that killed conversions left for these shards."""
  for path in paths:
    for tmp in glob.glob(glob.escape(_local_target(path)) + ".tmp-*"):
      log.info("removing %s, left by an interrupted conversion", tmp)
      os.remove(tmp)


def convert(config: ml_collections.ConfigDict, out_dir: str, *, workers: int = 1,
            records_per_shard: int = 10_000, prefix: str = "data", progress: bool = True,
            log: Callable[[str], None] = print) -> dict[str, int]:
  """Converts config.data.source over config.data.train_files into `out_dir`.

  Returns the summed counts ("records", "written", "skipped/<reason>") of the shards
  written by this call; shards already present are skipped (resume). A summary of all
  shards converted so far goes to out_dir/convert.json.
  """
  storage.makedirs(out_dir)
  units = work_units(config, records_per_unit=records_per_shard)
  jobs = [(u, shard_path(out_dir, u.index, len(units), prefix)) for u in units]
  todo = [job for job in jobs if not storage.exists(job[1])]
  _remove_stale_temporaries([path for _, path in todo])
  if len(todo) < len(jobs):
    log(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} shards already written")
  bar = Progress("data convert", len(todo), "shards", enabled=progress and bool(todo))
  summary_path = storage.join(out_dir, "convert.json")
  per_shard = {}
  if storage.exists(summary_path):
    per_shard = json.loads(storage.read_bytes(summary_path)).get("shards", {})
  total: collections.Counter[str] = collections.Counter()

  def done(path: str, counts: dict[str, int]) -> None:
    total.update(counts)
    bar.update(bar.done + 1, records=total["records"],
               skipped=sum(v for k, v in total.items() if k.startswith("skipped/")))
    per_shard[os.path.basename(path)] = counts
    all_counts: collections.Counter[str] = collections.Counter()
    for c in per_shard.values():
      all_counts.update(c)
    storage.write_atomic(summary_path, json.dumps(
        {"source": config.data.source, "files": config.data.train_files,
         "totals": dict(all_counts), "shards": per_shard}, indent=2, sort_keys=True))

  if workers > 1 and len(todo) > 1:
    with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
      for (_, path), counts in zip(todo, pool.imap(_convert_unit, todo)):
        done(path, counts)
  else:
    for job in todo:
      done(job[1], _convert_unit(job))
  bar.close()
  return dict(total)
