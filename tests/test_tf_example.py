"""tf.train.Example wire format: round trips and hand-encoded messages."""

import pytest

from navit_clip.data.sources.tf_example import (ExampleParseError, encode_example,
                                                   parse_example)
from navit_clip.data.sources.tf_example import ExampleKeys, example_to_record


def test_round_trip():
  features = {"image/encoded": b"\xff\xd8bytes", "caption": ["one", b"two"],
              "label": [3, -1, 1 << 40], "score": [0.5, -2.0], "empty": []}
  out = parse_example(encode_example(features))
  assert out == {"image/encoded": [b"\xff\xd8bytes"], "caption": [b"one", b"two"],
                 "label": [3, -1, 1 << 40], "score": [0.5, -2.0], "empty": []}


def test_unpacked_int64_and_float_values():
  # Feature{int64_list{value: 7 value: 300}} written unpacked, as proto2 writers do.
  int64_list = b"\x08\x07" + b"\x08\xac\x02"
  feature = b"\x1a" + bytes([len(int64_list)]) + int64_list
  entry = b"\x0a\x01k" + b"\x12" + bytes([len(feature)]) + feature
  features = b"\x0a" + bytes([len(entry)]) + entry
  example = b"\x0a" + bytes([len(features)]) + features
  assert parse_example(example) == {"k": [7, 300]}
  float_list = b"\x0d\x00\x00\x80\x3f"  # one unpacked float 1.0
  feature = b"\x12" + bytes([len(float_list)]) + float_list
  entry = b"\x0a\x01f" + b"\x12" + bytes([len(feature)]) + feature
  features = b"\x0a" + bytes([len(entry)]) + entry
  assert parse_example(b"\x0a" + bytes([len(features)]) + features) == {"f": [1.0]}


@pytest.mark.parametrize("data", [b"\x0a\xff\xff\xff\x0f", b"\x0a\x05abc", b"\x0f"])
def test_malformed_raises(data):
  with pytest.raises(ExampleParseError):
    parse_example(data)


def test_example_to_record():
  keys = ExampleKeys(caption="texts")
  record = example_to_record(encode_example(
      {"image/encoded": b"img", "texts": ["a", "b"], "image/format": "png", "label": 4,
       "labels": [1, 2], "example_id": 9}), keys)
  assert record == {"image": b"img", "caption": [b"a", b"b"], "image_format": "png",
                    "label": 4, "labels": [1, 2], "example_id": 9}
  assert example_to_record(b"\x0a\x05abc", keys) == {"skip": "bad_example", "example_id": -1}
