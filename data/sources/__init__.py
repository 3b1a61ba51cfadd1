"""Record sources: random-access (ArrayRecord, folders, demo) and streamed (webdataset
tar shards, TFRecord files), all yielding records of one schema:

  image         encoded bytes (with "image_format": the declared format / file name) or a
                decoded uint8 [H, W, C] array
  caption       str, bytes, or a list of them (several captions per image)
  example_id    int, unique within the source
  other fields  labels and metadata (ints / lists of ints)

or skip markers (`navit_clip.data.counters`) for records they refuse.
"""
