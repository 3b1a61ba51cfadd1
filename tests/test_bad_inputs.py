"""A corpus of bad inputs runs through the training pipeline: no crash, exact counters."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from data_fixtures import encode, image_array, jpeg, write_tar, write_tfrecords
from navit_clip.data import pipeline
from navit_clip.data.counters import BadSourceError, data_counters
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.data.sources.tfrecord import masked_crc


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _chunk(kind: bytes, body: bytes) -> bytes:
  return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
  """A tiny PNG whose header claims width x height (one short IDAT)."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + _chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
  im = Image.fromarray(image_array(20, 40))
  exif = Image.Exif()
  exif[0x0112] = 6
  return encode(im, "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
  frames = [Image.fromarray(image_array(16, 16, s)).convert("P") for s in range(3)]
  buf = io.BytesIO()
  frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
  return buf.getvalue()


def _usable_images() -> dict[str, bytes]:
  rgb = image_array(16, 24)
  palette = Image.fromarray(rgb).convert("P")
  palette.info["transparency"] = 0
  return {
      "ok.jpg": jpeg(),
      "png_named.jpg": encode(rgb, "PNG"),  # mislabelled, decodable: noted
      "anim.gif": _animated_gif(),
      "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
      "gray16.png": encode(Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "PNG"),
      "palette.png": encode(palette, "PNG", transparency=0),
      "la.png": encode(Image.fromarray(rgb).convert("LA"), "PNG"),
      "rotated.jpg": _exif_rotated_jpeg(),
      "x.bmp": encode(rgb, "BMP"),
      "x.tiff": encode(rgb, "TIFF"),
      "x.webp": encode(rgb, "WEBP"),
  }


def _bad_images() -> dict[str, tuple[bytes, str]]:
  j, p = jpeg(64, 64), encode(image_array(64, 64), "PNG")
  return {
      "empty.jpg": (b"", "empty"),
      "trunc.jpg": (j[:len(j) // 2], "truncated"),
      "no_eoi.jpg": (j[:-2], "truncated"),
      "trunc.png": (p[:len(p) // 2], "truncated"),
      "html.jpg": (b"<html><body>404 not found</body></html>", "not_an_image"),
      "random.bin": (bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8)),
                     "not_an_image"),
      "bomb.png": (png_claiming(50_000, 50_000), "decompression_bomb"),
      "one.png": (encode(image_array(1, 1), "PNG"), "too_small"),
      "strip.png": (encode(image_array(10, 1000), "PNG"), "extreme_aspect"),
      "zeroed.jpg": (j[:200] + bytes(len(j) - 200), "corrupt"),
      "bad_crc.png": (p[:40] + bytes([p[40] ^ 0xFF]) + p[41:], "corrupt"),
      "x.ppm": (encode(image_array(16, 16), "PPM"), "unsupported_format"),
  }


def _folder_corpus(root: str) -> tuple[dict[str, int], int]:
  """Writes images + captions.jsonl; returns (expected counters, usable count)."""
  lines, expected, usable = [], {}, 0

  def add(line: str | bytes, reason: str | None = None, note: str | None = None):
    nonlocal usable
    lines.append(line.encode("utf-8") if isinstance(line, str) else line)
    if reason:
      expected[f"skipped/{reason}"] = expected.get(f"skipped/{reason}", 0) + 1
    else:
      usable += 1
    if note:
      expected[f"noted/{note}"] = expected.get(f"noted/{note}", 0) + 1

  for name, data in _usable_images().items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
    add(json.dumps({"file": name, "caption": "a red circle"}),
        note="mislabelled" if name == "png_named.jpg" else None)
  for name, (data, reason) in _bad_images().items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
    add(json.dumps({"file": name, "caption": "a red circle"}), reason)
  add(json.dumps({"file": "ok.jpg", "caption": ""}), "empty_caption")
  add(json.dumps({"file": "ok.jpg", "caption": " \t "}), "empty_caption")
  add(json.dumps({"file": "ok.jpg"}), "missing_caption")
  add(json.dumps({"file": "ok.jpg", "captions": []}), "missing_caption")
  add(json.dumps({"file": "ok.jpg", "captions": ["", "a blue square"]}))
  add(b'{"file": "ok.jpg", "caption": "a red \xff\xfe circle"}', note="caption_repaired")
  add(json.dumps({"file": "missing.jpg", "caption": "x"}), "unreadable_file")
  os.mkdir(os.path.join(root, "dir.jpg"))
  add(json.dumps({"file": "dir.jpg", "caption": "x"}), "unreadable_file")
  add(json.dumps({"file": "../outside.jpg", "caption": "x"}), "unsafe_path")
  add(json.dumps({"file": "/etc/hostname", "caption": "x"}), "unsafe_path")
  add('{"file": "ok.jpg", "caption": ', "bad_index_line")
  with open(os.path.join(root, "captions.jsonl"), "wb") as f:
    f.write(b"\n".join(lines))
  return expected, usable


def _tar_corpus(root: str) -> tuple[str, dict[str, int], int]:
  path = os.path.join(root, "bad-0.tar")
  with tarfile.open(path, "w") as tar:
    def add(name, data=b"", kind=tarfile.REGTYPE, link=""):
      info = tarfile.TarInfo(name)
      info.type, info.linkname, info.size = kind, link, len(data)
      tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    add("good1.jpg", jpeg())
    add("good1.json", b'{"caption": "a green star"}')
    add("../x.jpg", jpeg())
    add("../x.txt", b"escape")
    add("/abs.jpg", jpeg())
    add("sym.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
    add("sym.txt", b"symlink")
    add("hard.jpg", kind=tarfile.LNKTYPE, link="good1.jpg")
    add("fifo.jpg", kind=tarfile.FIFOTYPE)
    add("big.jpg", bytes(30_000))
    add("big.txt", b"too big")
    add("textonly.txt", b"no image here")
    add("emptyimg.jpg", b"")
    add("emptyimg.txt", b"a caption")
    add("latin1.jpg", jpeg(seed=3))
    add("latin1.txt", "caf\xe9".encode("latin-1"))
  expected = {"skipped/tar_unsafe_path": 2, "skipped/tar_link": 2, "skipped/tar_special": 1,
              "skipped/tar_oversized": 1, "skipped/no_image": 1, "skipped/empty": 1,
              "noted/caption_repaired": 1}
  # A second shard cut in the middle of its second image.
  cut = os.path.join(root, "bad-1.tar")
  write_tar(cut, [("a.jpg", jpeg()), ("a.txt", b"a red cross"), ("b.jpg", jpeg(64, 64, 1)),
                  ("b.txt", b"never read")])
  with open(cut, "rb") as f:
    data = f.read()
  with open(cut, "wb") as f:
    f.write(data[:512 * 6])
  expected["skipped/tar_truncated"] = 1
  return os.path.join(root, "bad-{0..1}.tar"), expected, 3  # good1, latin1, a


def _tfrecord_corpus(root: str) -> tuple[str, dict[str, int], int]:
  path = os.path.join(root, "bad.tfrecord")
  good = encode_example({"image/encoded": jpeg(), "caption": "a purple circle"})
  write_tfrecords(path, [good, b"\x0a\xff\xff\xff\x0f", encode_example({"caption": "no image"}),
                         good])
  with open(path, "ab") as f:
    length = struct.pack("<Q", 1000)  # a valid header, then the file ends
    f.write(length + struct.pack("<I", masked_crc(length)) + b"short")
  return path, {"skipped/bad_example": 1, "skipped/missing_image": 1,
                "skipped/truncated_file": 1}, 2


def _run(config, source, files, workers=0):
  config.data.source, config.data.train_files = source, files
  config.data.num_workers = workers
  it = iter(pipeline.make_train_dataset(config))
  batches = list(it)
  ids = [i for b in batches for i in b["example_id"][b["image_mask"]].tolist()]
  return ids, data_counters(it)


@pytest.fixture
def config(tiny_config):
  c = tiny_config()
  c.data.num_epochs = 1
  c.data.shard_by_process = False
  c.data.max_bad_fraction = 1.0
  c.data.max_member_bytes = 25_000  # refuses big.jpg (30,000 bytes), reads strip.png
  c.data.cycle_length = 2
  return c


def test_bad_corpus_counts_exactly(config, tmp_path):
  folder = tmp_path / "folder"
  folder.mkdir()
  expected, usable = _folder_corpus(str(folder))
  tar_files, tar_expected, tar_usable = _tar_corpus(str(tmp_path))
  tf_file, tf_expected, tf_usable = _tfrecord_corpus(str(tmp_path))
  total_inputs = sum(expected.values()) + sum(tar_expected.values()) + sum(tf_expected.values())
  assert total_inputs >= 30

  ids, counters = _run(config, "folder", str(folder))
  records = usable + sum(v for k, v in expected.items() if k.startswith("skipped/"))
  skipped = records - usable
  assert counters == {"records": records, "skipped": skipped, **expected}
  assert len(ids) == usable == len(set(ids))

  ids, counters = _run(config, "webdataset", tar_files)
  skipped = sum(v for k, v in tar_expected.items() if k.startswith("skipped/"))
  assert counters == {"records": tar_usable + skipped, "skipped": skipped, **tar_expected}
  assert len(ids) == tar_usable

  ids, counters = _run(config, "tfrecord", tf_file)
  assert counters == {"records": tf_usable + 3, "skipped": 3, **tf_expected}
  assert len(ids) == tf_usable


def test_bad_corpus_counts_survive_worker_processes(config, tmp_path):
  expected, usable = _folder_corpus(str(tmp_path))
  ids0, counters0 = _run(config, "folder", str(tmp_path))
  ids2, counters2 = _run(config, "folder", str(tmp_path), workers=2)
  assert ids0 == ids2 and counters0 == counters2


def test_mostly_bad_source_stops_with_a_clear_message(config, tmp_path):
  for i in range(12):
    (tmp_path / f"{i}.jpg").write_bytes(b"<html>not an image</html>" if i % 4 else jpeg())
  (tmp_path / "captions.jsonl").write_text(
      "\n".join(json.dumps({"file": f"{i}.jpg", "caption": "a red star"}) for i in range(12)))
  config.data.max_bad_fraction = 0.5
  config.data.bad_check_min_records = 8
  with pytest.raises(BadSourceError, match=r"not_an_image: \d+.*max_bad_fraction"):
    _run(config, "folder", str(tmp_path))
