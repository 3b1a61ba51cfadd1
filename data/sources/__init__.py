"""navit_clip.data.sources: record sources, random-access and streamed, of one schema.

Random-access: ArrayRecord, folders, demo; streamed: webdataset tar shards, TFRecord files.
Each yields records of one schema:

  image         encoded bytes (with "image_format": the declared format / file name) or a
                decoded uint8 [H, W, C] array
  caption       str, bytes, or a list of them (several captions per image)
  example_id    int, unique within the source
  other fields  labels and metadata (ints / lists of ints)

or skip markers (`navit_clip.data.counters`) for records they refuse.
"""
