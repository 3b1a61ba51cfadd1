"""tf.train.Example without TensorFlow: its protobuf wire format, and Example -> record.

The messages (tensorflow/core/example/{example,feature}.proto):

  Example   { Features features = 1; }
  Features  { map<string, Feature> feature = 1; }   entries: { string key = 1; Feature value = 2; }
  Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                           Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }
  FloatList { repeated float value = 1 [packed = true]; }
  Int64List { repeated int64 value = 1 [packed = true]; }

Values come back as Python lists: bytes_list -> list[bytes], float_list -> list[float],
int64_list -> list[int]. Both packed and unpacked repeated numbers are read (proto2 writers
emit unpacked ones); unknown fields are skipped, as protobuf requires.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from navit_clip.data.counters import HELD_KEY, skip_marker

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ExampleParseError(ValueError):
  """The bytes are not a well-formed tf.train.Example."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ExampleParseError("truncated varint")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ExampleParseError("varint longer than 10 bytes")


def _fields(buf: bytes):
  """Yields (field number, wire type, value) with LEN values as bytes, numbers as ints."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _varint(buf, pos)
    elif wire == _LEN:
      n, pos = _varint(buf, pos)
      if pos + n > end:
        raise ExampleParseError(f"field {number} claims {n} bytes, {end - pos} left")
      value, pos = buf[pos:pos + n], pos + n
    elif wire == _I64:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == _I32:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ExampleParseError(f"unsupported wire type {wire} in field {number}")
    if pos > end:
      raise ExampleParseError(f"field {number} runs past the end of the message")
    yield number, wire, value


def _int64s(wire: int, value) -> list[int]:
  if wire == _VARINT:
    values = [value]
  elif wire == _LEN:
    values, pos = [], 0
    while pos < len(value):
      v, pos = _varint(value, pos)
      values.append(v)
  else:
    raise ExampleParseError(f"int64_list value has wire type {wire}")
  return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _floats(wire: int, value) -> list[float]:
  if wire == _I32:
    return [struct.unpack("<f", value)[0]]
  if wire == _LEN and len(value) % 4 == 0:
    return np.frombuffer(value, "<f4").astype(float).tolist()
  raise ExampleParseError(f"float_list value has wire type {wire} and {len(value)} bytes")


def _feature(buf: bytes) -> list:
  out = []
  for number, wire, value in _fields(buf):
    if wire != _LEN:
      raise ExampleParseError(f"Feature field {number} has wire type {wire}")
    for n, w, v in _fields(value):
      if n != 1:
        continue
      if number == 1:
        if w != _LEN:
          raise ExampleParseError(f"bytes_list value has wire type {w}")
        out.append(bytes(v))
      elif number == 2:
        out.extend(_floats(w, v))
      elif number == 3:
        out.extend(_int64s(w, v))
  return out


def parse_example(data: bytes) -> dict[str, list]:
  """Serialized tf.train.Example -> {feature name: list of values}.

  Raises:
    ExampleParseError: `data` is not a well-formed Example.
  """
  features: dict[str, list] = {}
  for number, wire, value in _fields(bytes(data)):
    if number != 1 or wire != _LEN:
      continue
    for n, w, entry in _fields(value):
      if n != 1 or w != _LEN:
        continue
      key, feature = None, b""
      for en, ew, ev in _fields(entry):
        if en == 1 and ew == _LEN:
          key = bytes(ev).decode("utf-8", errors="replace")
        elif en == 2 and ew == _LEN:
          feature = ev
      if key is None:
        raise ExampleParseError("a Features map entry has no key")
      features[key] = _feature(feature)
  return features


def _encode_varint(value: int) -> bytes:
  value &= (1 << 64) - 1
  out = bytearray()
  while True:
    b = value & 0x7F
    value >>= 7
    if value:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
  return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _encode_feature(name: str, values) -> bytes:
  if isinstance(values, (str, bytes, int, float, np.generic)):
    values = [values]
  values = list(values)
  if all(isinstance(v, (bytes, str)) for v in values):
    items = b"".join(_len_field(1, v.encode("utf-8") if isinstance(v, str) else v)
                     for v in values)
    return _len_field(1, items)
  if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    packed = b"".join(_encode_varint(int(v)) for v in values)
    return _len_field(3, _len_field(1, packed) if values else b"")
  if all(isinstance(v, (float, np.floating)) for v in values):
    packed = np.asarray(values, "<f4").tobytes()
    return _len_field(2, _len_field(1, packed) if values else b"")
  raise TypeError(f"feature {name!r}: values must be all bytes/str, all ints or all floats, "
                  f"got {[type(v).__name__ for v in values]}")


def encode_example(features: Mapping[str, Sequence | bytes | str | int | float]) -> bytes:
  """{name: value or list of values} -> serialized tf.train.Example.

  str and bytes values go to bytes_list (str as UTF-8), ints to int64_list, floats to
  float_list. A scalar is a list of one.
  """
  entries = b"".join(
      _len_field(1, _len_field(1, name.encode("utf-8")) + _len_field(2, _encode_feature(name, v)))
      for name, v in features.items())
  return _len_field(1, entries)


@dataclasses.dataclass(frozen=True)
class ExampleKeys:
  """Feature names of the fields of a record.

  Defaults match what `navit-clip data convert` writes; WebLI-style data often uses
  image="image/encoded", caption="texts"; TFDS ImageNet image="image", label "label".
  Numeric features (int64_list, float_list) are all copied into the record under their own
  names (one value -> a scalar), so labels need no key here: config.data.label_field names
  the feature.

  Attributes:
    image: bytes_list holding the encoded image (first value used).
    caption: bytes_list with one caption or several ("" = no captions).
    example_id: int64_list with the record's id ("" = derive it from the position).
    image_format: bytes_list declaring the format ("jpeg", "png"; "" = none).
  """

  image: str = "image/encoded"
  caption: str = "caption"
  example_id: str = "example_id"
  image_format: str = "image/format"


def held_features(features: Mapping[str, list], keys: ExampleKeys) -> str:
  """What an Example lacking the image or caption feature of `keys` holds, for messages."""
  kinds = {name: ("bytes" if values and isinstance(values[0], bytes) else "numbers")
           for name, values in sorted(features.items())}
  return (f"the features {kinds} (config.data.example_keys: image = {keys.image!r}, "
          f"caption = {keys.caption!r})")


def example_to_record(data: bytes, keys: ExampleKeys) -> dict[str, Any]:
  """Parses a serialized Example; a malformed one becomes a "bad_example" skip marker.

  The record has "image" (bytes) if the image feature is present, "caption" (bytes, or a
  list of bytes when there are several), "example_id" (int) if present, "image_format"
  (str) if declared, and every numeric feature (int / float, or a list of them). A record
  without the image feature, or without the caption feature when `keys` names one, says
  under HELD_KEY which features the Example has (`held_features`).
  """
  try:
    features = parse_example(data)
  except ExampleParseError:
    return skip_marker("bad_example", -1)
  record: dict[str, Any] = {}
  for name, values in features.items():
    if values and not isinstance(values[0], bytes):
      record[name] = values[0] if len(values) == 1 else values
  image = features.get(keys.image)
  if image and isinstance(image[0], bytes):
    record["image"] = image[0]
  captions = features.get(keys.caption) if keys.caption else None
  if captions and isinstance(captions[0], bytes):
    record["caption"] = captions[0] if len(captions) == 1 else captions
  ids = features.get(keys.example_id) if keys.example_id else None
  if ids and isinstance(ids[0], int):
    record["example_id"] = ids[0]
  fmt = features.get(keys.image_format) if keys.image_format else None
  if fmt and isinstance(fmt[0], bytes):
    record["image_format"] = fmt[0].decode("ascii", errors="replace")
  if "image" not in record or (keys.caption and "caption" not in record):
    record[HELD_KEY] = held_features(features, keys)
  return record
