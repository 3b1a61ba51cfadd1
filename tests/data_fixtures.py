"""Tiny on-disk datasets for the data tests (encoded images, tar shards, TFRecords), and
the checks they share: full-size decoding, packed batches against their spec."""

from __future__ import annotations

import io
import os
import struct
import tarfile
from collections.abc import Iterable

import numpy as np
from PIL import Image

from navit_clip.data.batch import BatchSpec
from navit_clip.data.decode import DecodeLimits, open_image
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.data.sources.tfrecord import masked_crc

_COLORS = ("red", "green", "blue", "yellow", "purple")  # words the demo tokenizer knows
_SHAPES = ("circle", "square", "triangle", "cross", "star")


def image_array(h: int, w: int, seed: int = 0) -> np.ndarray:
  """uint8 [h, w, 3]: a smooth gradient plus noise (compresses like a photo)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) % 256], -1)
  return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
  im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def jpeg(h: int = 24, w: int = 32, seed: int = 0) -> bytes:
  return encode(image_array(h, w, seed), "JPEG", quality=90)


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(),
                 declared: str | None = None) -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, 3] RGB at full size; raises DecodeError."""
  return open_image(data, limits, declared).load()


def validate_batch(batch: dict, spec: BatchSpec) -> None:
  """Raises ValueError naming the field if `batch` does not match `spec` exactly."""
  want = spec.shapes()
  missing = sorted(set(want) - set(batch))
  if missing:
    raise ValueError(f"packed batch is missing fields {missing}; expected {sorted(want)}")
  for name, (shape, dtype) in want.items():
    arr = batch[name]
    if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
      raise ValueError(
          f"packed batch field {name!r} is {np.dtype(arr.dtype).name}{list(arr.shape)}, "
          f"expected {dtype.name}{list(shape)}")


def write_tfrecords(path: str, records: Iterable[bytes]) -> None:
  """Writes byte strings as a TFRecord file, with their masked CRC-32Cs."""
  with open(path, "wb") as f:
    for data in records:
      length = struct.pack("<Q", len(data))
      f.write(length + struct.pack("<I", masked_crc(length)) + data
              + struct.pack("<I", masked_crc(data)))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
  """A tar of (name, bytes) regular files, in order."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      _add(tar, name, data)


def webdataset_shards(root: str, num_shards: int, per_shard: int, *, size=(24, 32),
                      json_captions: bool = False) -> tuple[str, dict[int, str]]:
  """Shards shard-{00000..N-1}.tar of KEY.jpg + KEY.txt (or .json); -> (pattern, captions).

  The returned captions map the example id the stream gives (file << 32 | n) to its text.
  """
  captions = {}
  for s in range(num_shards):
    members = []
    for n in range(per_shard):
      key = f"{s:05d}{n:04d}"
      text = f"image {s} {n}"
      members.append((f"{key}.jpg", jpeg(*size, seed=s * 1000 + n)))
      if json_captions:
        members.append((f"{key}.json", f'{{"caption": "{text}"}}'.encode()))
      else:
        members.append((f"{key}.txt", text.encode()))
      captions[s << 32 | n] = text
    write_tar(os.path.join(root, f"shard-{s:05d}.tar"), members)
  return os.path.join(root, "shard-{00000..%05d}.tar" % (num_shards - 1)), captions


def tfrecord_files(root: str, num_files: int, per_file: int, *, size=(24, 32),
                   caption_key: str = "caption", captions_per_image: int = 1) -> str:
  """files data-{i}.tfrecord of Examples with image/encoded, captions, label, example_id."""
  for i in range(num_files):
    records = []
    for n in range(per_file):
      eid = i * per_file + n
      texts = [f"a {_COLORS[c % 5]} {_SHAPES[eid % 5]}" for c in range(captions_per_image)]
      records.append(encode_example({
          "image/encoded": jpeg(*size, seed=eid), "image/format": "jpeg",
          caption_key: texts, "label": eid % 5, "example_id": eid}))
    write_tfrecords(os.path.join(root, f"data-{i}.tfrecord"), records)
  return os.path.join(root, "data-*.tfrecord")
