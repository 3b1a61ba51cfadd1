"""Exporting image and text embeddings to files, in input order, resumable.

Output for OUT (a prefix, or a path ending in .npy or .parquet):
  OUT.npy            float32 / float16 [N, D], row i = the i-th usable input
  OUT.jsonl          one line per row: {"index": input position, "path" or "id" or "text"}
  OUT.skipped.jsonl  one line per unusable input: {"index", "path" or "id", "reason"}
or, for .parquet (needs pyarrow), one table with the same columns plus "embedding".

Work proceeds in chunks of inputs; each finished chunk is written under OUT.parts/ (its
.npy last, atomically), so an interrupted run started again skips the chunks it has and
continues. The chunks are merged into the final files at the end and OUT.parts/ removed.
Images are packed several per row, so a chunk embeds in a few large calls. OUT may be a
URL (s3://, gs://: navit_clip.storage); the chunks are then kept there and the final .npy
is assembled in a local temporary file and uploaded. Progress (inputs done, rate, ETA) is
logged every few seconds.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np

from navit_clip import storage
from navit_clip.data.pipeline import decode_limits
from navit_clip.data.progress import Progress
from navit_clip.evaluate.embedder import Embedder, embed_packed
from navit_clip.evaluate.files import ImageFiles
from navit_clip.evaluate.inference_batches import Skipped, inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec
from navit_clip.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
CHUNK = 4096  # inputs per resumable chunk

# (start, stop) -> (embeddings [n, D], one metadata dict per row, one per skipped input)
ChunkFn = Callable[[int, int], tuple[np.ndarray, list[dict], list[dict]]]


def output_paths(out: str) -> dict[str, str]:
  """The files written for OUT (see the module docstring)."""
  if out.endswith(".parquet"):
    base = out[:-len(".parquet")]
    return {"parquet": out, "skipped": base + ".skipped.jsonl", "parts": base + ".parts"}
  base = out[:-len(".npy")] if out.endswith(".npy") else out
  return {"npy": base + ".npy", "jsonl": base + ".jsonl", "skipped": base + ".skipped.jsonl",
          "parts": base + ".parts"}


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
  storage.write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_bytes(path).decode("utf-8").splitlines()
          if line.strip()]


def _save_npy(path: str, array: np.ndarray) -> None:
  """`array` as a whole .npy file at `path` (local or remote), never half written."""
  buf = io.BytesIO()
  np.save(buf, array)
  storage.write_atomic(path, buf.getvalue())


def _load_npy(path: str) -> np.ndarray:
  """A chunk's array: memory-mapped when local, read whole from an object store."""
  if storage.is_local(path):
    return np.load(path, mmap_mode="r")
  return np.load(io.BytesIO(storage.read_bytes(path)))


def _write_parquet(path: str, meta: list[dict], parts: list[str], dtype: str) -> None:
  try:
    import pyarrow as pa  # optional: only for .parquet output
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("Parquet output needs pyarrow (pip install pyarrow); or write .npy "
                      "+ .jsonl by giving --out without .parquet") from None
  arrays = [np.asarray(_load_npy(p + ".npy")) for p in parts]
  dim = next((a.shape[1] for a in arrays if a.ndim == 2 and len(a)), 0)
  emb = np.concatenate(arrays) if meta else np.zeros((0, dim), dtype)
  columns = {k: [row.get(k) for row in meta] for k in (meta[0] if meta else {"index": 0})}
  columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
  with storage.open(path, "wb") as f:
    pq.write_table(pa.table(columns), f)


def _write_npy(path: str, parts: list[str], rows: int, dtype: str) -> None:
  """Stacks the chunks' arrays into .npy file `path` through a memory-mapped local file
  (renamed into place, or put to the object store), so no more than a chunk is in memory."""
  first = next((a for a in (_load_npy(p + ".npy") for p in parts) if len(a)), None)
  dim = first.shape[1] if first is not None else 0
  if storage.is_local(path):
    local = path + ".tmp.npy"
  else:
    fd, local = tempfile.mkstemp(suffix=".npy")
    os.close(fd)
  try:
    merged = np.lib.format.open_memmap(local, mode="w+", dtype=dtype, shape=(rows, dim))
    row = 0
    for p in parts:
      a = _load_npy(p + ".npy")
      merged[row:row + len(a)] = a
      row += len(a)
    merged.flush()
    del merged
    if storage.is_local(path):
      os.replace(local, path)
    else:
      storage.put_file(local, path)
  finally:
    if os.path.exists(local):
      os.remove(local)


def _merge(paths: dict[str, str], parts: list[str], dtype: str) -> int:
  """Concatenates the chunk files into the final output; returns the row count."""
  meta = [row for p in parts for row in _read_jsonl(p + ".jsonl")]
  _write_jsonl(paths["skipped"], [row for p in parts
                                  for row in _read_jsonl(p + ".skipped.jsonl")])
  if "parquet" in paths:
    _write_parquet(paths["parquet"], meta, parts, dtype)
  else:
    _write_npy(paths["npy"], parts, len(meta), dtype)
    _write_jsonl(paths["jsonl"], meta)
  return len(meta)


def run_chunks(total: int, compute: ChunkFn, out: str, *, dtype: str = "float32",
               chunk: int = CHUNK, progress: Progress | None = None) -> dict:
  """Computes chunks [start, start + chunk) of `total` inputs, resumably, then merges.

  `out` is a local path or a URL (navit_clip.storage): the chunks are kept under OUT.parts/
  there, so an interrupted run resumes from wherever it ran.

  Returns:
    {"rows": usable inputs written, "skipped": unusable ones, "files": written paths}.
  """
  if dtype not in DTYPES:
    raise ValueError(f"embedding dtype {dtype!r}; expected one of {list(DTYPES)}")
  if chunk < 1:
    raise ValueError(f"chunk size must be >= 1, got {chunk}")
  paths = output_paths(out)
  storage.makedirs(paths["parts"])
  parts, skipped = [], 0
  for start in range(0, total, chunk):
    stop = min(start + chunk, total)
    part = storage.join(paths["parts"], f"{start:012d}")
    parts.append(part)
    if not storage.exists(part + ".npy"):
      emb, meta, bad = compute(start, stop)
      _write_jsonl(part + ".jsonl", meta)
      _write_jsonl(part + ".skipped.jsonl", bad)
      _save_npy(part + ".npy", emb.astype(dtype))  # last: it marks the chunk done
    skipped += len(_read_jsonl(part + ".skipped.jsonl"))
    if progress is not None:
      progress.update(stop, skipped=skipped)
  if progress is not None:
    progress.close()
  rows = _merge(paths, parts, dtype)
  storage.remove_tree(paths["parts"])
  files = [p for k, p in paths.items() if k != "parts"]
  return {"rows": rows, "skipped": skipped, "files": files}


def _describe(source, index: int, example_id: int) -> dict:
  """How an input is named in the output: its path for files, else its example id."""
  if isinstance(source, ImageFiles):
    return {"index": index, "path": source.paths[index]}
  return {"index": index, "id": example_id}


def export_image_embeddings(embedder: Embedder, config: ml_collections.ConfigDict, source,
                            out: str, *, policy: ResolutionPolicy, dtype: str = "float32",
                            chunk: int = CHUNK, batch_size: int = 0, seq_len: int = 0,
                            max_images: int = 0, num_workers: int = 0,
                            progress: bool = True) -> dict:
  """Embeds every image of `source` into OUT (see the module docstring), in input order.

  Args:
    source: random-access records {"image", "example_id"}, with example ids increasing
      with the index (ImageFiles, DemoSource and the evaluation datasets are).
    policy: the inference resolution policy.
    batch_size, seq_len, max_images: the packed batch shape (0 = defaults, see
      `policy.inference_spec`).
  """
  if isinstance(source, grain.IterDataset):
    raise ValueError(f"embedding export resumes by record range, which needs a random-access "
                     f"source; {source} is a stream: convert it to ArrayRecord with "
                     "`navit-clip data convert` and embed arrayrecord:GLOB")
  spec = inference_spec(config, policy, batch_size=batch_size, seq_len=seq_len,
                        max_images=max_images)
  sampler = policy.sampler(spec.patch_size, spec.seq_len, config.data.resolution.max_upscale)
  bar = Progress("embed images", len(source), enabled=progress)

  def compute(start: int, stop: int):
    skipped: list[Skipped] = []
    before = bar.skipped  # of the chunks done

    def show(n: int) -> None:
      bar.update(start + n, skipped=before + len(skipped))

    batches = inference_batches(source, spec, sampler, start=start, stop=stop,
                                num_workers=num_workers, limits=decode_limits(config),
                                resample=policy.resample, draft=policy.draft,
                                skipped=skipped, on_records=show)
    first = next(batches, None)
    ids = np.zeros((0,), np.int64)
    emb = np.zeros((0, 0), np.float32)
    if first is not None:
      embedded = embed_packed(embedder, itertools.chain([first], batches))
      ids, emb = embedded["example_id"], embedded["embedding"]
    offset = int(source[start]["example_id"]) - start
    meta = [_describe(source, int(i) - offset, int(i)) for i in ids]
    bad = [dict(_describe(source, s.example_id - offset, s.example_id), reason=s.reason)
           for s in skipped]
    for b in bad:
      log.warning("skipped %s: %s", b.get("path", b.get("id")), b["reason"])
    return emb, meta, bad

  return run_chunks(len(source), compute, out, dtype=dtype, chunk=chunk, progress=bar)


def read_texts(path: str) -> list[str]:
  """One text per line of a UTF-8 file (local or a URL), empty lines kept out."""
  with storage.open(path, "r") as f:
    texts = [line.rstrip("\n") for line in f]
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError(f"text file {path!r} has no non-empty lines")
  return texts


def export_text_embeddings(embedder: Embedder, tokenizer: Tokenizer, texts: Sequence[str],
                           out: str, *, dtype: str = "float32", chunk: int = CHUNK,
                           progress: bool = True) -> dict:
  """Embeds `texts` into OUT (rows {"index", "text"}), in order, resumable."""
  bar = Progress("embed texts", len(texts), "texts", enabled=progress)

  def compute(start: int, stop: int):
    emb = embedder.texts(tokenizer.encode(texts[start:stop]))
    meta = [{"index": i, "text": texts[i]} for i in range(start, stop)]
    return emb, meta, []

  return run_chunks(len(texts), compute, out, dtype=dtype, chunk=chunk, progress=bar)
