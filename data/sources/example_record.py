"""tf.train.Example bytes -> a record of the common schema (see navit_clip.data.sources)."""

from __future__ import annotations

import dataclasses
from typing import Any

from navit_clip.data.counters import skip_marker
from navit_clip.data.sources.example_proto import ExampleParseError, parse_example


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


def example_to_record(data: bytes, keys: ExampleKeys) -> dict[str, Any]:
  """Parses a serialized Example; a malformed one becomes a "bad_example" skip marker.

  The record has "image" (bytes) if the image feature is present, "caption" (bytes, or a
  list of bytes when there are several), "example_id" (int) if present, "image_format"
  (str) if declared, and every numeric feature (int / float, or a list of them).
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
  return record
