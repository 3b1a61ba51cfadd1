"""Evaluation over streamed sources (TFRecord, webdataset): one ordered pass, every record
exactly once, unusable ones listed, and the same accuracy as a class-folder copy."""

import os

import pytest

from data_fixtures import encode, image_array, jpeg, webdataset_shards, write_tfrecords
from navit_clip.config import eval_config
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.evaluate.datasets import load_eval_data
from navit_clip.evaluate.embedder import Embedder
from navit_clip.evaluate.inference_batches import Skipped, inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec
from navit_clip.evaluate.restore import restore_model
from navit_clip.evaluate.runner import run_all
from navit_clip.embedding_writer import export_image_embeddings

COLORS = ("blue", "green", "purple", "red", "yellow")  # sorted: class folders agree
RGB = {"blue": (30, 40, 220), "green": (30, 200, 40), "purple": (140, 30, 160),
       "red": (220, 30, 30), "yellow": (230, 220, 30)}


def _example(image: bytes, **features) -> bytes:
  return encode_example({"image/encoded": image, "image/format": "jpeg", **features})


def _labelled_tfrecords(root: str) -> tuple[str, dict[int, int]]:
  """Two files of good records plus a third of bad ones, truncated; -> (glob, id -> label)."""
  labels = {}
  for f in range(2):
    records = []
    for n in range(4):
      eid = 10 * f + n
      labels[eid] = eid % 5
      records.append(_example(jpeg(24, 32, seed=eid), label=eid % 5, example_id=eid))
    write_tfrecords(os.path.join(root, f"data-{f}.tfrecord"), records)
  bad = [_example(b"not an image", label=1, example_id=100),
         _example(jpeg(seed=1), label=7, example_id=101),  # out of range
         _example(jpeg(seed=2), example_id=102),  # no label
         b"\xff\x00 not an Example",
         _example(jpeg(seed=3), label=2, example_id=103)]
  path = os.path.join(root, "data-2.tfrecord")
  write_tfrecords(path, bad)
  labels[103] = 2
  with open(path, "ab") as f:
    f.write(b"\x01\x02\x03")  # a truncated record header
  return os.path.join(root, "data-*.tfrecord"), labels


def _batches(config, data, **kwargs):
  spec = inference_spec(config, ResolutionPolicy.parse("budget:16"), num_classes=5)
  sampler = ResolutionPolicy.parse("budget:16").sampler(spec.patch_size, spec.seq_len, 1.0)
  return inference_batches(data.source, spec, sampler, label_field=data.label_field, **kwargs)


def test_tfrecord_labels_reach_the_evaluator_exactly_once(tiny_config, tmp_path):
  config = tiny_config()
  pattern, labels = _labelled_tfrecords(str(tmp_path))
  data = load_eval_data(f"tfrecord:{pattern}", config)
  skipped: list[Skipped] = []
  seen = []
  for batch in _batches(config, data, skipped=skipped):
    mask = batch["image_mask"]
    seen += zip(batch["example_id"][mask].tolist(), batch["labels"][mask].tolist())
  assert sorted(seen) == sorted(labels.items())
  file2 = 2 << 32
  assert sorted((s.example_id, s.reason) for s in skipped) == [
      (100, "not_an_image"), (101, "bad_label"), (102, "bad_label"),
      (file2 | 3, "bad_example"), (file2 | 5, "truncated_file")]
  first: list[Skipped] = []
  ids = [i for b in _batches(config, data, stop=3, skipped=first)
         for i in b["example_id"][b["image_mask"]].tolist()]
  assert sorted(ids) == [0, 1, 2] and not first
  with pytest.raises(ValueError, match="first record"):
    next(_batches(config, data, start=2))


def test_tfrecord_zero_shot_equals_class_folders(trained_demo_workdir, tmp_path):
  restored = restore_model(trained_demo_workdir)
  config = restored.config
  examples = []
  for eid in range(15):
    label = eid % 5
    image = image_array(24 + 8 * (eid % 3), 32, seed=eid)
    if eid < 10:  # tinted by its class; the rest are untinted, so some are missed
      image = image // 4 + RGB[COLORS[label]]
    examples.append((eid, label, encode(image.clip(0, 255).astype("uint8"), "PNG")))
  examples.append((15, 0, b"broken bytes"))
  for eid, label, data in examples:
    os.makedirs(tmp_path / "folders" / COLORS[label], exist_ok=True)
    (tmp_path / "folders" / COLORS[label] / f"{eid:03d}.png").write_bytes(data)
  write_tfrecords(str(tmp_path / "val.tfrecord"),
                  [_example(data, label=label, example_id=eid) for eid, label, data in examples])
  (tmp_path / "classes.txt").write_text("\n".join(COLORS) + "\n")
  common = dict(templates="clip_short", resolution="budget:32", batch_size=4)
  config.evals.folder = eval_config("zeroshot", f"folder:{tmp_path / 'folders'}", **common)
  config.evals.stream = eval_config("zeroshot", f"tfrecord:{tmp_path / 'val.tfrecord'}",
                                    classnames=str(tmp_path / "classes.txt"), **common)
  out = run_all(Embedder(restored.model), config, ["folder", "stream"])
  folder, stream = out["folder"], out["stream"]
  assert stream["num_images"] == folder["num_images"] == 15
  assert stream["skipped"] == folder["skipped"] == 1
  assert stream["skipped_reasons"] == folder["skipped_reasons"]
  for key in ("top1", "top5", "per_class_top1"):
    assert stream[key] == folder[key], key
  assert 0.5 < stream["top1"] < 1.0


def test_webdataset_retrieval_reads_captions_from_the_stream(trained_demo_workdir, tmp_path):
  restored = restore_model(trained_demo_workdir)
  config = restored.config
  pattern, captions = webdataset_shards(str(tmp_path), num_shards=2, per_shard=3)
  data = load_eval_data(f"webdataset:{pattern}", config)
  assert dict(data.captions) == {i: [text] for i, text in captions.items()}
  config.evals.wds = eval_config("retrieval", f"webdataset:{pattern}", resolution="budget:16")
  out = run_all(restored.model, config, ["wds"])["wds"]
  assert out["num_images"] == out["num_texts"] == 6 and out["skipped"] == 0
  assert out["i2t_r@10"] == out["t2i_r@10"] == 1.0
  with pytest.raises(ValueError, match="random-access"):
    export_image_embeddings(Embedder(restored.model), config, data.source,
                            str(tmp_path / "emb"), policy=ResolutionPolicy.parse("budget:16"))
