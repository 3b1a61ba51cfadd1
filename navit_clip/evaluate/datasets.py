"""Evaluation datasets named by a string: labelled images for zero-shot, captioned for retrieval.

  demo[:TASK]          the held-out demo split; TASK = shape | color | label (zero-shot,
                       with the demo's class names and templates), or captions (retrieval)
  folder:DIR           ImageNet-style class folders DIR/<class>/<images>
  arrayrecord:GLOB     ArrayRecord shards of tf.train.Example with an int label feature
                       (config.data.label_field, keys config.data.example_keys); class
                       names from the evaluator's `classnames`
  coco:CAPTIONS.json   COCO captions (images[], annotations[] with image_id, caption);
                       images under `images_dir` (default: the JSON's directory)
  karpathy:SPLIT.json  Karpathy's COCO / Flickr30k split file (images[] with filename,
                       split, sentences[].raw); `split` picks test / val / train
                       (for both, an image path that leaves the image folder, absolute or
                       through "..", is refused: a skipped "unsafe_path"; a malformed file
                       is a ValueError naming it)
  tfrecord:GLOB        TFRecord files of tf.train.Example, streamed: an int label feature
                       (config.data.label_field) for zero-shot, captions
                       (config.data.example_keys.caption) for retrieval; class names from
                       the evaluator's `classnames`
  webdataset:PATTERN   webdataset tar shards, streamed: KEY.txt / KEY.json captions for
                       retrieval, KEY.cls labels ("label") for zero-shot

Every file, folder and pattern may be local or a URL (gs://, s3://; http(s):// for streamed
shards and files named one by one; navit_clip.storage). Every kind gives a source of records {"image", "example_id", ...} for
`inputs.inference_batches` -- random access, or for tfrecord / webdataset one ordered pass
(`navit_clip.data.pipeline.make_stream`) -- plus what the evaluator needs: a label field
and class names, or each image's captions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import ml_collections

from navit_clip import storage
from navit_clip.data.captions import usable_captions
from navit_clip.data.sources.demo import DemoSource, zero_shot_tasks
from navit_clip.data.pipeline import example_keys, make_stream
from navit_clip.data.sources.arrayrecord import ArrayRecordSource
from navit_clip.data.sources.folder import ClassFolderSource, RootedFiles
from navit_clip.data.sources.paths import expand_paths
from navit_clip.evaluate.stream_captions import StreamCaptions

KINDS = ("demo", "folder", "arrayrecord", "coco", "karpathy", "tfds", "tfrecord",
         "webdataset")


@dataclasses.dataclass
class EvalData:
  """A source plus its labels or captions.

  Attributes:
    source: len() and [i] -> record {"image", "example_id", label_field?}; for streamed
      kinds a grain.IterDataset of such records, one ordered pass.
    name: the dataset string, for messages.
    label_field: the record field holding the int class (zero-shot), or None.
    classnames: class index -> name (zero-shot), or None when the evaluator must name them.
    templates: templates that come with the dataset (the demo's), or None.
    captions: example_id -> captions (retrieval), or None.
  """

  source: object
  name: str
  label_field: str | None = None
  classnames: Sequence[str] | None = None
  templates: Sequence[str] | None = None
  captions: Mapping[int, Sequence[str]] | None = None


def _demo(arg: str, config: ml_collections.ConfigDict) -> EvalData:
  source = DemoSource("eval", num_examples=config.data.num_eval_examples,
                      seed=config.data.source_seed)
  name = f"demo:{arg}" if arg else "demo"
  if arg in ("", "captions"):
    captions = {source.id_offset + i: [source.caption(i)] for i in range(len(source))}
    return EvalData(source, name, captions=captions)
  tasks = zero_shot_tasks()
  if arg not in tasks:
    raise ValueError(f"dataset {name!r}: demo task must be one of "
                     f"{sorted(tasks) + ['captions']}")
  task = tasks[arg]
  return EvalData(source, name, label_field=task.label_field, classnames=task.classnames,
                  templates=task.templates)


def _annotation_images(path: str, kind: str) -> tuple[dict, list[dict]]:
  """(the JSON object of annotation file `path`, its "images" entries).

  Raises:
    ValueError: naming the file, when it is not JSON or has no list of image objects.
  """
  try:
    with storage.open(path, "r", encoding="utf-8-sig") as f:
      data = json.load(f)
  except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
    raise ValueError(f"dataset {kind}:{path}: not a valid JSON file ({e})") from None
  images = data.get("images") if isinstance(data, dict) else None
  if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
    raise ValueError(f"dataset {kind}:{path}: expected a JSON object whose 'images' is a "
                     "list of objects")
  return data, images


def _relative_path(*parts) -> str | None:
  """An annotation's image path from its parts; None if a part is not a string (then the
  source refuses it as "unsafe_path")."""
  return os.path.join(*parts) if all(isinstance(p, str) for p in parts) else None


def _coco(path: str, images_dir: str) -> EvalData:
  data, images = _annotation_images(path, "coco")
  annotations = data.get("annotations")
  if not isinstance(annotations, list) or any(
      not isinstance(im.get("id"), int) or isinstance(im.get("id"), bool) for im in images):
    raise ValueError(f"dataset coco:{path}: expected an 'annotations' list and an integer "
                     "'id' on every image")
  root = images_dir or storage.parent(path)
  images = sorted(images, key=lambda im: im["id"])
  index = {im["id"]: i for i, im in enumerate(images)}
  captions: dict[int, list[str]] = {i: [] for i in range(len(images))}
  for ann in annotations:
    image_id = ann.get("image_id") if isinstance(ann, dict) else None
    if isinstance(image_id, int) and image_id in index:
      captions[index[image_id]].extend(usable_captions(ann.get("caption")))
  rels = [_relative_path(im.get("file_name")) for im in images]
  return EvalData(RootedFiles(root, rels), f"coco:{path}", captions=captions)


def _karpathy_captions(image: dict) -> list[str]:
  sentences = image.get("sentences")
  if not isinstance(sentences, list):
    return []
  return usable_captions([s.get("raw") for s in sentences if isinstance(s, dict)])


def _karpathy(path: str, split: str, images_dir: str) -> EvalData:
  _, images = _annotation_images(path, "karpathy")
  root = images_dir or storage.parent(path)
  images = [im for im in images if im.get("split") == split]
  if not images:
    raise ValueError(f"dataset karpathy:{path} has no images in split {split!r}")
  rels = [_relative_path(im.get("filepath", ""), im.get("filename")) for im in images]
  captions = {i: _karpathy_captions(im) for i, im in enumerate(images)}
  return EvalData(RootedFiles(root, rels), f"karpathy:{path}", captions=captions)


class _TfdsRecords:
  """A TFDS random-access data source seen as {"image", "example_id", "label"} records."""

  def __init__(self, source, image_key: str, label_key: str):
    self._source, self._image_key, self._label_key = source, image_key, label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    example = self._source[int(index)]
    return {"image": example[self._image_key], "example_id": int(index),
            "label": example[self._label_key]}


def _tfds(name: str, split: str, data_dir: str) -> EvalData:
  try:
    import tensorflow_datasets as tfds  # optional: only for tfds: datasets
  except ImportError:
    raise ImportError(f"dataset tfds:{name} needs tensorflow-datasets "
                      "(pip install tensorflow-datasets)") from None
  builder = tfds.builder(name, data_dir=data_dir or None)
  label = builder.info.features["label"]
  source = builder.as_data_source(split=split)
  return EvalData(_TfdsRecords(source, "image", "label"), f"tfds:{name}", label_field="label",
                  classnames=[n.replace("_", " ") for n in label.names])


def _stream(kind: str, spec: str, files: str, config: ml_collections.ConfigDict) -> EvalData:
  """TFRecord / webdataset files as one ordered pass, with labels and lazily read captions."""
  stream = make_stream(config, kind, files)
  label_field = config.data.label_field if kind == "tfrecord" else "label"
  return EvalData(stream, spec, label_field=label_field,
                  captions=StreamCaptions(stream, spec, config.data.caption_repair))


def load_eval_data(spec: str, config: ml_collections.ConfigDict, *, split: str = "test",
                   images_dir: str = "", data_dir: str = "") -> EvalData:
  """The dataset named by `spec` (see the module docstring)."""
  kind, _, arg = spec.partition(":")
  if kind == "demo":
    return _demo(arg, config)
  if not arg:
    raise ValueError(f"dataset {spec!r} needs a path or name after '{kind}:'")
  if kind == "folder":
    source = ClassFolderSource(arg)
    return EvalData(source, spec, label_field="label", classnames=source.classnames)
  if kind == "arrayrecord":
    source = ArrayRecordSource(expand_paths(arg, what="ArrayRecord files"),
                               example_keys(config))
    return EvalData(source, spec, label_field=config.data.label_field)
  if kind == "coco":
    return _coco(arg, images_dir)
  if kind == "karpathy":
    return _karpathy(arg, split, images_dir)
  if kind == "tfds":
    return _tfds(arg, split, data_dir)
  if kind in ("tfrecord", "webdataset"):
    return _stream(kind, spec, arg, config)
  raise ValueError(f"dataset {spec!r}: kind {kind!r} is not one of {list(KINDS)}")
