"""Fault injection into every source kind: real damaged files, each with its outcome.

Each case writes a damaged input and asserts one of two outcomes: skipped and counted with
its reason (the stream goes on), or a clear one-line error naming the input. The cases:

  webdataset tar      gnu_longname_1tib, pax_header_1tib (tar_oversized_header: no
                      allocation), pax_size_1tib, cut_in_second_header,
                      bitflip_second_header (the sample before the damage, then
                      tar_corrupt), bitflip_first_header, garbage, cut_in_member_data,
                      json_nested_deep, zero_byte (empty, not an error), fifo, directory;
                      one shard of several with a 1 TiB header, through training
  TFRecord            length_512gib, length_crc_flipped, data_bitflip, oversized_record,
                      gzip, zlib, gzip_truncated, gzip_garbage, header_cut, footer_cut,
                      zero_byte, fifo
  ArrayRecord         truncated, zero_byte, fifo, garbage (one of several: counted), a
                      damaged record, all files unreadable (error), most files unreadable
                      (stops by the share of files)
  caption folder      fifo_listed, oversized_image, null_byte_path, bom_jsonl,
                      json_nested_deep, csv_field_over_limit, bom_csv, index_is_fifo
                      (error), symlink_to_fifo
  class folders       fifo, oversized_file
  COCO / Karpathy     paths escaping the image folder (../, absolute), Karpathy
                      filepath "..", not JSON, no annotations list (errors), captions
                      that are not strings
  streams             an all-empty shard set stops with a message within seconds (signals
                      answered), zero-byte TFRecords, 10 of 11 shards unreadable stops
                      the run, a reader that raises, all records undecodable at
                      max_bad_fraction = 1, file counts survive a checkpoint
  mixture             ids near 2**63 - 1 fit int64 and stay unique, end to end
  convert             non-string captions (5, true, a list, 1e11), a failing shard leaves
                      no temporary file, nor does a killed one after the next run
  inspect             nothing usable is an error; GZIP TFRecords are read
  decode              a 16-bit PNG decodes in the image's own dtype (peak memory)
"""

import contextlib
import gzip
import json
import os
import re
import signal
import struct
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from data_fixtures import encode, jpeg, write_tar, write_tfrecords
from navit_clip.config import default_config
from navit_clip.data import pipeline
from navit_clip.data.convert import _convert_unit, convert
from navit_clip.data.counters import FAILED_FILES_KEY, BadSourceError, data_counters
from navit_clip.data.decode import DecodeLimits, open_image
from navit_clip.data.inspect import inspect_source
from navit_clip.data.sources.arrayrecord import ArrayRecordSource
from navit_clip.data.sources.folder import CaptionFolderSource, ClassFolderSource
from navit_clip.data.sources.stream import (EmptyPassError, FileStream, mixture_id,
                                            ID_MIXTURE_SHIFT)
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.data.sources.tfrecord import TFRecordReader, masked_crc
from navit_clip.data.sources.webdataset import TarReader
from navit_clip.data.work_units import Unit
from navit_clip.evaluate.datasets import load_eval_data

TIB = 1 << 40


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Hung(BaseException):
  """A hang: not an Exception (nor an OSError), so that no reader's handler swallows it."""


@contextlib.contextmanager
def deadline(seconds: int):
  """Raises Hung in the main thread after `seconds`: a hang fails the test."""

  def expire(signum, frame):
    raise Hung(f"no answer within {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def outcome(records) -> list[str]:
  """Each record as its skip reason, or "ok"."""
  return [r.get("skip", "ok") for r in records]


def read_all(reader, path: str) -> list[dict]:
  with deadline(20):
    return [record for record, _ in reader.read(path, 0)]


# --- webdataset tar ------------------------------------------------------------------


def tar_header(name: bytes, size: int, typeflag: bytes) -> bytes:
  """One GNU tar header block; a size of 8 GiB or more in base-256, as GNU tar writes it."""
  h = bytearray(512)
  h[:len(name)] = name
  h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
  h[124:136] = b"%011o\0" % size if size < 8 ** 11 else b"\x80" + size.to_bytes(11, "big")
  h[136:148], h[148:156], h[156:157] = b"00000000000\0", b" " * 8, typeflag
  h[257:265] = b"ustar  \0"
  h[148:156] = b"%06o\0 " % sum(h)
  return bytes(h)


def _sample_tar(path: str) -> list[int]:
  """Samples a and b (jpg + txt); returns the member header offsets."""
  write_tar(path, [("a.jpg", jpeg()), ("a.txt", b"a red star"), ("b.jpg", jpeg(seed=1)),
                   ("b.txt", b"a blue cross")])
  with tarfile.open(path) as tar:
    return [m.offset for m in tar.getmembers()]


def _damage(path: str, edit) -> None:
  with open(path, "rb") as f:
    data = bytearray(f.read())
  with open(path, "wb") as f:
    f.write(edit(data))


def _flip(offset: int):
  def edit(data):
    data[offset] ^= 0xFF
    return bytes(data)
  return edit


def _pax_member(name: str, payload: bytes, pax: dict) -> bytes:
  info = tarfile.TarInfo(name)
  info.size, info.pax_headers = len(payload), pax
  return info.tobuf(format=tarfile.PAX_FORMAT) + payload + bytes(-len(payload) % 512)


def _tar_case(case: str, path: str) -> None:
  if case == "gnu_longname_1tib":
    _write(path, tar_header(b"././@LongLink", TIB, b"L") + bytes(2048))
  elif case == "pax_header_1tib":
    _write(path, tar_header(b"././@PaxHeader", TIB, b"x") + bytes(2048))
  elif case == "pax_size_1tib":
    _write(path, _pax_member("c.jpg", jpeg(), {"size": str(TIB)}) + bytes(1024))
  elif case == "cut_in_second_header":
    offsets = _sample_tar(path)
    _damage(path, lambda d: bytes(d[:offsets[2] + 100]))
  elif case == "bitflip_second_header":
    offsets = _sample_tar(path)
    _damage(path, _flip(offsets[2] + 150))
  elif case == "bitflip_first_header":
    _sample_tar(path)
    _damage(path, _flip(150))
  elif case == "garbage":
    _write(path, bytes(np.random.default_rng(0).integers(1, 256, 4000, np.uint8)))
  elif case == "cut_in_member_data":
    offsets = _sample_tar(path)
    _damage(path, lambda d: bytes(d[:offsets[2] + 700]))
  elif case == "json_nested_deep":
    write_tar(path, [("a.jpg", jpeg()), ("a.json", b"[" * 5000)])
  elif case == "zero_byte":
    _write(path, b"")
  elif case == "fifo":
    os.mkfifo(path)
  elif case == "directory":
    os.mkdir(path)
  elif case == "intact":
    _sample_tar(path)


def _write(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


@pytest.mark.parametrize("case, expected", [
    ("gnu_longname_1tib", ["tar_oversized_header"]),
    ("pax_header_1tib", ["tar_oversized_header"]),
    ("pax_size_1tib", ["tar_oversized", "tar_corrupt"]),
    ("cut_in_second_header", ["ok", "tar_corrupt"]),
    ("bitflip_second_header", ["ok", "tar_corrupt"]),
    ("bitflip_first_header", ["tar_corrupt"]),
    ("garbage", ["tar_corrupt"]),
    ("cut_in_member_data", ["ok", "tar_truncated"]),
    ("json_nested_deep", ["ok"]),
    ("zero_byte", []),
    ("fifo", ["unreadable_file"]),
    ("directory", ["unreadable_file"]),
    ("intact", ["ok", "ok"]),  # the end-of-archive check reads no more than the limit
])
def test_damaged_tar_shards_are_counted(tmp_path, case, expected):
  path = str(tmp_path / "shard.tar")
  _tar_case(case, path)
  records = read_all(TarReader(max_member_bytes=8000), path)
  assert outcome(records) == expected
  if case == "json_nested_deep":
    assert "caption" not in records[0]


def test_resume_after_damage_counts_it_once(tmp_path):
  path = str(tmp_path / "shard.tar")
  offsets = _sample_tar(path)
  _damage(path, _flip(offsets[2] + 150))
  (first, offset), _ = list(TarReader().read(path, 0))
  assert "image" in first
  assert outcome(r for r, _ in TarReader().read(path, offset)) == ["tar_corrupt"]


# --- TFRecord ------------------------------------------------------------------------


def _example(caption: str) -> bytes:
  return encode_example({"image/encoded": jpeg(16, 16), "caption": caption})


def _tfrecord_header(length: int) -> bytes:
  raw = struct.pack("<Q", length)
  return raw + struct.pack("<I", masked_crc(raw))


def _tfrecord_case(case: str, path: str) -> None:
  good = [_example("a red star"), _example("a blue cross")]
  write_tfrecords(path, good)
  first_end = 12 + len(good[0]) + 4
  if case == "length_512gib":
    _write(path, _tfrecord_header(1 << 39) + b"x" * 100)
  elif case == "length_crc_flipped":
    _damage(path, _flip(first_end + 9))
  elif case == "data_bitflip":
    _damage(path, lambda d: d.replace(b"a red star", b"a red stap", 1))
  elif case == "oversized_record":
    big = encode_example({"image/encoded": bytes(5000), "caption": "big"})
    write_tfrecords(path, [big, good[1]])
  elif case == "gzip":
    _damage(path, gzip.compress)
  elif case == "zlib":
    _damage(path, zlib.compress)
  elif case == "gzip_truncated":
    _damage(path, lambda d: gzip.compress(bytes(d))[:-30])
  elif case == "gzip_garbage":
    _write(path, b"\x1f\x8b" + bytes(np.random.default_rng(1).integers(0, 256, 300, np.uint8)))
  elif case == "header_cut":
    _damage(path, lambda d: bytes(d) + b"\x01\x02\x03\x04\x05")
  elif case == "footer_cut":
    _damage(path, lambda d: bytes(d[:-2]))
  elif case == "zero_byte":
    _write(path, b"")
  elif case == "fifo":
    os.remove(path)
    os.mkfifo(path)


@pytest.mark.parametrize("case, expected", [
    ("length_512gib", ["truncated_file"]),
    ("length_crc_flipped", ["ok", "corrupt_record"]),
    ("data_bitflip", ["corrupt_record", "ok"]),
    ("oversized_record", ["oversized_record", "ok"]),
    ("gzip", ["ok", "ok"]),
    ("zlib", ["ok", "ok"]),
    ("gzip_truncated", ["ok", "truncated_file"]),
    ("gzip_garbage", ["corrupt_file"]),
    ("header_cut", ["ok", "ok", "truncated_file"]),
    ("footer_cut", ["ok", "truncated_file"]),
    ("zero_byte", []),
    ("fifo", ["unreadable_file"]),
])
def test_damaged_tfrecords_are_counted(tmp_path, case, expected):
  path = str(tmp_path / "data.tfrecord")
  _tfrecord_case(case, path)
  records = read_all(TFRecordReader(max_record_bytes=4000), path)
  assert outcome(records) == expected
  good = [r["caption"] for r in records if "caption" in r]
  assert set(good) <= {b"a red star", b"a blue cross"}  # never a damaged caption


def test_compressed_tfrecords_resume_at_their_offsets(tmp_path):
  path = str(tmp_path / "data.tfrecord")
  write_tfrecords(path, [_example(f"caption {i}") for i in range(4)])
  _damage(path, gzip.compress)
  offsets = [o for _, o in TFRecordReader().read(path, 0)]
  rest = [r["caption"] for r, _ in TFRecordReader().read(path, offsets[1])]
  assert rest == [b"caption 2", b"caption 3"]


# --- ArrayRecord ---------------------------------------------------------------------


def _array_record(path: str, captions: list[str]) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, "group_size:1")
  for c in captions:
    writer.write(_example(c))
  writer.close()


@pytest.mark.parametrize("case", ["truncated", "zero_byte", "fifo", "garbage"])
def test_an_unreadable_arrayrecord_file_is_counted(tmp_path, case):
  good = [str(tmp_path / f"good-{i}.array_record") for i in range(2)]
  for i, p in enumerate(good):
    _array_record(p, [f"file {i} record {n}" for n in range(3)])
  bad = str(tmp_path / "bad.array_record")
  if case == "fifo":
    os.mkfifo(bad)
  else:
    with open(good[0], "rb") as f:
      data = f.read()
    _write(bad, {"truncated": data[:len(data) // 2], "zero_byte": b"",
                 "garbage": os.urandom(70_000)}[case])
  with deadline(20):
    source = ArrayRecordSource([good[0], bad, good[1]])
  records = [source[i] for i in range(len(source))]
  assert outcome(records) == ["ok"] * 6 + ["unreadable_file"]
  assert records[-1][FAILED_FILES_KEY][1:] == (1, 3)


def test_a_damaged_arrayrecord_record_is_counted(tmp_path):
  path = str(tmp_path / "a.array_record")
  _array_record(path, [f"record {n} " + "x" * 2000 for n in range(3)])
  _damage(path, _flip(1000))
  source = ArrayRecordSource([path])
  assert outcome(source[i] for i in range(len(source))).count("unreadable_record") == 1


def test_no_readable_arrayrecord_file_is_a_clear_error(tmp_path):
  (tmp_path / "a.array_record").write_bytes(b"")
  with pytest.raises(ValueError, match=r"none of the 1 can be read.*a\.array_record"):
    ArrayRecordSource([str(tmp_path / "a.array_record")])


# --- caption folders and class folders -----------------------------------------------


def _folder(root, lines, files=(), index="captions.jsonl"):
  for name, data in files:
    (root / name).write_bytes(data)
  (root / index).write_bytes(b"\n".join(x.encode() if isinstance(x, str) else x
                                        for x in lines))


@pytest.mark.parametrize("case, expected", [
    ("fifo_listed", ["unreadable_file", "ok"]),
    ("oversized_image", ["oversized_file", "ok"]),
    ("null_byte_path", ["unsafe_path", "ok"]),
    ("bom_jsonl", ["ok", "ok"]),
    ("json_nested_deep", ["bad_index_line", "ok"]),
    ("csv_field_over_limit", ["bad_index_line", "ok"]),
    ("bom_csv", ["ok", "ok"]),
    ("symlink_to_fifo", ["unreadable_file", "ok"]),
])
def test_damaged_caption_folders_are_counted(tmp_path, case, expected):
  ok = json.dumps({"file": "ok.jpg", "caption": "a red star"})
  files = [("ok.jpg", jpeg()), ("big.jpg", bytes(5000))]
  index = "captions.jsonl"
  if case in ("fifo_listed", "symlink_to_fifo"):
    os.mkfifo(tmp_path / "pipe.jpg")
    if case == "symlink_to_fifo":
      os.symlink(tmp_path / "pipe.jpg", tmp_path / "link.jpg")
    first = json.dumps({"file": "pipe.jpg" if case == "fifo_listed" else "link.jpg",
                        "caption": "x"})
  elif case == "oversized_image":
    first = json.dumps({"file": "big.jpg", "caption": "x"})
  elif case == "null_byte_path":
    first = json.dumps({"file": "ok.jpg\x00.png", "caption": "x"})
  elif case == "bom_jsonl":
    first = "\ufeff" + ok
  elif case == "json_nested_deep":
    first = "[" * 100_000
  else:
    index = "captions.csv"
    first = ("\ufefffile,caption\nok.jpg,a red star" if case == "bom_csv"
             else "file,caption\nok.jpg," + "x" * 200_000)
    ok = "ok.jpg,a blue cross"
  _folder(tmp_path, [first, ok], files, index)
  with deadline(20):
    source = CaptionFolderSource(str(tmp_path), max_file_bytes=4000)
    records = [source[i] for i in range(len(source))]
  assert outcome(records) == expected
  assert all(r["caption"] in ("a red star", "a blue cross") for r in records if "image" in r)


def test_an_index_file_that_is_a_fifo_is_a_clear_error(tmp_path):
  os.mkfifo(tmp_path / "captions.jsonl")
  with deadline(20), pytest.raises(ValueError, match="captions.jsonl.*not a regular file"):
    CaptionFolderSource(str(tmp_path))


def test_class_folders_refuse_fifos_and_oversized_files(tmp_path):
  (tmp_path / "cat").mkdir()
  (tmp_path / "cat" / "a.jpg").write_bytes(jpeg())
  (tmp_path / "cat" / "big.jpg").write_bytes(bytes(5000))
  os.mkfifo(tmp_path / "cat" / "pipe.jpg")
  with deadline(20):
    source = ClassFolderSource(str(tmp_path), max_file_bytes=4000)
    assert outcome(source[i] for i in range(len(source))) == [
        "ok", "oversized_file", "unreadable_file"]


# --- COCO / Karpathy annotations -----------------------------------------------------


def _coco(tmp_path, images, annotations) -> str:
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "ok.jpg").write_bytes(jpeg())
  (tmp_path / "secret.jpg").write_bytes(jpeg(seed=5))
  path = tmp_path / "images" / "captions.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations}))
  return str(path)


def test_coco_paths_that_leave_the_image_folder_are_refused(tmp_path):
  secret = str(tmp_path / "secret.jpg")
  path = _coco(tmp_path, [{"id": 1, "file_name": "ok.jpg"},
                          {"id": 2, "file_name": "../secret.jpg"},
                          {"id": 3, "file_name": secret}, {"id": 4, "file_name": 7}],
               [{"image_id": 1, "caption": "a red star"}, {"image_id": 1, "caption": 5},
                {"image_id": 2, "caption": None}, {"image_id": [1], "caption": "x"}])
  data = load_eval_data(f"coco:{path}", default_config())
  assert outcome(data.source[i] for i in range(4)) == ["ok"] + ["unsafe_path"] * 3
  assert data.captions == {0: ["a red star"], 1: [], 2: [], 3: []}


def test_karpathy_paths_that_leave_the_image_folder_are_refused(tmp_path):
  (tmp_path / "val").mkdir()
  (tmp_path / "val" / "ok.jpg").write_bytes(jpeg())
  (tmp_path / "secret.jpg").write_bytes(jpeg())
  split = {"images": [
      {"split": "test", "filepath": "val", "filename": "ok.jpg",
       "sentences": [{"raw": " a red star "}, {"raw": 3}]},
      {"split": "test", "filepath": "..", "filename": "secret.jpg", "sentences": "x"}]}
  path = tmp_path / "val" / "split.json"
  path.write_text(json.dumps(split))
  data = load_eval_data(f"karpathy:{path}", default_config(), images_dir=str(tmp_path))
  assert outcome(data.source[i] for i in range(2)) == ["ok", "unsafe_path"]
  assert data.captions == {0: ["a red star"], 1: []}


@pytest.mark.parametrize("text, match", [
    ("{not json", "not a valid JSON file"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}]}', "'annotations' list"),
    ('[1, 2]', "'images' is a list of objects"),
])
def test_malformed_coco_files_are_clear_errors(tmp_path, text, match):
  path = tmp_path / "captions.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=f"coco:{re.escape(str(path))}.*{match}"):
    load_eval_data(f"coco:{path}", default_config())


# --- streams through the training pipeline -------------------------------------------


@pytest.fixture
def config(tiny_config):
  c = tiny_config()
  c.data.num_epochs = 1
  c.data.shard_by_process = False
  c.data.cycle_length = 2
  c.data.shuffle_window = 1
  return c


def _train(config, source, files):
  config.data.source, config.data.train_files = source, files
  with deadline(60):
    it = iter(pipeline.make_train_dataset(config))
    batches = list(it)
  return [i for b in batches for i in b["example_id"][b["image_mask"]].tolist()], it


def _good_shard(path: str, n: int, seed: int = 0) -> None:
  write_tar(path, [m for k in range(n) for m in ((f"{seed}{k:03d}.jpg", jpeg(seed=seed + k)),
                                                  (f"{seed}{k:03d}.txt", b"a red star"))])


def test_an_all_empty_shard_set_stops_within_seconds(config, tmp_path):
  for i in range(12):
    with tarfile.open(tmp_path / f"shard-{i:02d}.tar", "w"):
      pass  # an empty but valid tar, as img2dataset writes when every download failed
  config.data.num_epochs = 0  # endless: today's spin
  config.data.source = "webdataset"
  config.data.train_files = str(tmp_path / "shard-{00..11}.tar")
  with deadline(20), pytest.raises(EmptyPassError, match=r"12 files \(.*shard-0.*and 9 more"
                                   r"\) yielded no usable record \(every file is empty\)"):
    next(iter(pipeline.make_train_dataset(config)))


def test_zero_byte_tfrecords_stop_with_a_message(config, tmp_path):
  for i in range(2):
    (tmp_path / f"{i}.tfrecord").write_bytes(b"")
  with pytest.raises(EmptyPassError, match=r"tfrecord .*2 files.*no usable record"):
    _train(config, "tfrecord", str(tmp_path / "*.tfrecord"))


def test_mostly_unreadable_shards_stop_by_their_share_of_files(config, tmp_path):
  _good_shard(str(tmp_path / "shard-00.tar"), 3)
  for i in range(1, 11):
    _write(str(tmp_path / f"shard-{i:02d}.tar"), b"not a tar" * 100)
  config.data.max_bad_fraction = 0.5
  with pytest.raises(BadSourceError, match=r"of the 11 files of webdataset.*could not be read"
                     r".*tar_corrupt.*share of the files"):
    _train(config, "webdataset", str(tmp_path / "shard-{00..10}.tar"))


def test_a_shard_with_a_huge_header_among_good_ones_is_counted(config, tmp_path):
  _good_shard(str(tmp_path / "shard-0.tar"), 3)
  _write(str(tmp_path / "shard-1.tar"), tar_header(b"././@LongLink", TIB, b"L") + bytes(1024))
  _good_shard(str(tmp_path / "shard-2.tar"), 2, seed=5)
  ids, it = _train(config, "webdataset", str(tmp_path / "shard-{0..2}.tar"))
  assert len(ids) == 5
  assert data_counters(it)["skipped/tar_oversized_header"] == 1


class _FlakyReader:
  """Reads tar shards, but raises on the one named "bad": an unforeseen reader error."""

  def read(self, path, offset):
    if "bad" in path:
      raise RuntimeError("device went away")
    yield from TarReader().read(path, offset)


def test_a_reader_exception_ends_only_its_file(tmp_path):
  _good_shard(str(tmp_path / "a.tar"), 2)
  _good_shard(str(tmp_path / "bad.tar"), 2)
  _good_shard(str(tmp_path / "c.tar"), 2, seed=5)
  paths = [str(tmp_path / n) for n in ("a.tar", "bad.tar", "c.tar")]
  stream = FileStream(paths, _FlakyReader(), file_ids=range(3), seed=0, cycle=1,
                      num_epochs=1, shuffle_files=False)
  records = list(stream)
  assert outcome(records) == ["ok", "ok", "read_error", "ok", "ok"]
  assert records[2][FAILED_FILES_KEY][1:] == (1, 3)


def test_a_source_with_nothing_decodable_stops_even_at_max_bad_fraction_1(config, tmp_path):
  for i in range(3):
    (tmp_path / f"{i}.jpg").write_bytes(b"<html>not an image</html>")
  _folder(tmp_path, [json.dumps({"file": f"{i}.jpg", "caption": "x"}) for i in range(3)])
  config.data.num_epochs = 0
  config.data.max_bad_fraction = 1.0
  config.data.bad_check_min_records = 20
  with pytest.raises(BadSourceError, match=r"none of the 20 records read was usable "
                     r"\(not_an_image: 20\)"):
    _train(config, "folder", str(tmp_path))


def test_failed_file_counts_survive_a_checkpoint(tmp_path):
  paths = [str(tmp_path / f"{i}.tar") for i in range(4)]
  for i, path in enumerate(paths):
    _good_shard(path, 2) if i == 1 else _write(path, b"not a tar" * 100)
  stream = FileStream(paths, TarReader(), file_ids=range(4), seed=0, cycle=1, num_epochs=1,
                      shuffle_files=False)
  it = iter(stream)
  first = [next(it) for _ in range(2)]  # 0.tar fails, then a sample of 1.tar
  resumed = iter(stream)
  resumed.set_state(it.get_state())
  failed = [r[FAILED_FILES_KEY][1:] for r in first + list(resumed) if FAILED_FILES_KEY in r]
  assert failed == [(1, 4), (2, 4), (3, 4)]


# --- mixtures ------------------------------------------------------------------------


def test_mixture_ids_fit_int64_and_stay_unique():
  top = (1 << 63) - 1
  ids = [top, top - 1, 1 << 48, (1 << 48) - 1, 0, -5]
  mixed = [mixture_id(c, i) for c in range(3) for i in ids]
  assert all(0 <= m < 1 << 63 for m in mixed)
  assert len(set(mixed)) == len(mixed)
  assert mixed == [mixture_id(c, i) for c in range(3) for i in ids]  # deterministic
  assert mixture_id(2, 7) == 2 << ID_MIXTURE_SHIFT | 7  # exact, readable ids kept


def test_mixture_of_sources_with_64_bit_ids_trains(config, tmp_path):
  for c in range(2):
    records = [encode_example({"image/encoded": jpeg(seed=c * 10 + n), "caption": "a red star",
                               "example_id": (1 << 63) - 1 - n}) for n in range(3)]
    write_tfrecords(str(tmp_path / f"{c}.tfrecord"), records)
  config.data.source, config.data.num_epochs = "mixture", 0
  config.data.mixture = ";".join(f"tfrecord:{tmp_path / f'{c}.tfrecord'}=1" for c in range(2))
  with deadline(60):
    it = iter(pipeline.make_train_dataset(config))
    batches = [next(it) for _ in range(3)]
  ids = {i for b in batches for i in b["example_id"][b["image_mask"]].tolist()}
  expected = {mixture_id(c, (1 << 63) - 1 - n): c for c in range(2) for n in range(3)}
  assert ids <= set(expected) and {expected[i] for i in ids} == {0, 1}


# --- convert and inspect -------------------------------------------------------------


def _captioned_folder(root, captions) -> None:
  _folder(root, [json.dumps({"file": "ok.jpg", "caption": c}) for c in captions],
          [("ok.jpg", jpeg())])


def test_convert_counts_non_string_captions_and_keeps_text_exactly(tmp_path):
  folder, out = tmp_path / "folder", tmp_path / "out"
  folder.mkdir()
  _captioned_folder(folder, [5, True, [[1, 2]], 1e11, ["a red star", 5], " a blue cross "])
  config = default_config()
  config.data.source, config.data.train_files = "folder", str(folder)
  counts = convert(config, str(out), progress=False, log=lambda _: None)
  assert counts == {"records": 6, "written": 2, "skipped/empty_caption": 4}
  source = ArrayRecordSource([str(p) for p in out.glob("*.array_record")])
  assert [source[i]["caption"] for i in range(2)] == [b"a red star", b" a blue cross "]
  assert not list(out.glob("*.tmp-*"))


class _FailingUnit(Unit):

  def records(self):
    yield {"image": jpeg(), "example_id": 0}
    raise RuntimeError("disk went away")


def test_a_failing_shard_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / "data-00000-of-00001.array_record")
  with pytest.raises(RuntimeError, match="disk went away"):
    _convert_unit((_FailingUnit(0), path))
  assert os.listdir(tmp_path) == []


def test_convert_removes_what_a_killed_conversion_left(tmp_path):
  folder, out = tmp_path / "folder", tmp_path / "out"
  folder.mkdir()
  out.mkdir()
  _captioned_folder(folder, ["a red star"])
  (out / "data-00000-of-00001.array_record.tmp-12345").write_bytes(b"half a shard")
  config = default_config()
  config.data.source, config.data.train_files = "folder", str(folder)
  convert(config, str(out), progress=False, log=lambda _: None)
  assert sorted(p.name for p in out.iterdir()) == ["convert.json",
                                                   "data-00000-of-00001.array_record"]


def test_inspect_with_nothing_usable_is_an_error(tmp_path):
  (tmp_path / "a.jpg").write_bytes(b"<html>")
  _folder(tmp_path, [json.dumps({"file": "a.jpg", "caption": "x"})])
  config = default_config()
  config.data.source, config.data.train_files = "folder", str(tmp_path)
  with pytest.raises(ValueError, match=r"no usable record in 1 read \(skipped/not_an_image"):
    inspect_source(config)


def test_inspect_reads_gzip_tfrecords(tmp_path):
  path = str(tmp_path / "a.tfrecord.gz")
  write_tfrecords(path, [_example("a red star"), _example("a blue cross")])
  _damage(path, gzip.compress)
  config = default_config()
  config.data.source, config.data.train_files = "tfrecord", path
  assert inspect_source(config).counts["usable"] == 2


# --- decode --------------------------------------------------------------------------


def test_16_bit_png_decodes_in_its_own_dtype():
  png = encode(Image.fromarray(np.full((1500, 2000), 40000, np.uint16)), "PNG")
  opened = open_image(png, DecodeLimits(max_aspect=0))
  tracemalloc.start()
  try:
    rgb = opened.load()
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert rgb.dtype == np.uint8 and rgb.shape == (1500, 2000, 3) and rgb[0, 0, 0] == 156
  assert peak < 8 * 1500 * 2000  # bytes per pixel; int64 / float64 copies took 17
