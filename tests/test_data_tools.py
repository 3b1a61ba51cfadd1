"""`navit-clip data convert` and `data inspect`, end to end on tiny fixtures."""

import json

import pytest

from data_fixtures import (encode, image_array, jpeg, tfrecord_files, webdataset_shards,
                           write_tar)
from navit_clip import cli
from navit_clip.config import default_config
from navit_clip.data.inspect import inspect_source
from navit_clip.data.sources.arrayrecord import ArrayRecordSource


def test_cli_convert_then_inspect(tmp_path, capsys):
  pattern, captions = webdataset_shards(str(tmp_path), num_shards=2, per_shard=3,
                                        json_captions=True)
  out = tmp_path / "ar"
  assert cli.main(["data", "convert", "--source", "webdataset", "--files", pattern,
                   "--out", str(out), "--workers", "2"]) == 0
  assert "wrote 6 of 6 records" in capsys.readouterr().out
  source = ArrayRecordSource(sorted(str(p) for p in out.glob("*.array_record")))
  by_id = {source[i]["example_id"]: source[i] for i in range(len(source))}
  assert {k: v["caption"].decode() for k, v in by_id.items()} == captions
  assert all(r["image_format"] == "jpg" for r in by_id.values())
  report_path = tmp_path / "report.json"
  assert cli.main(["data", "inspect", "--source", "arrayrecord", "--files",
                   str(out / "*.array_record"), "--json", str(report_path)]) == 0
  printed = capsys.readouterr().out
  assert "records 6: usable 6, unusable 0" in printed and "aspect ratio" in printed
  report = json.loads(report_path.read_text())
  assert report["formats"] == {"JPEG": 6}
  assert report["aspect_histogram"]["1.33 - 2.00"] == 6  # 32 x 24


def test_inspect_counts_and_histograms(tmp_path):
  (tmp_path / "a.jpg").write_bytes(jpeg(30, 90))
  (tmp_path / "b.png").write_bytes(encode(image_array(300, 300), "PNG"))
  (tmp_path / "c.jpg").write_bytes(b"<html>")
  truncated = jpeg(64, 64)
  (tmp_path / "d.jpg").write_bytes(truncated[:len(truncated) // 2])
  lines = [{"file": "a.jpg", "caption": "one two three"},
           {"file": "b.png", "captions": ["x", "a much longer caption of seven words"]},
           {"file": "c.jpg", "caption": "x"}, {"file": "d.jpg", "caption": "x"}]
  (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  config = default_config()
  config.data.source, config.data.train_files = "folder", str(tmp_path)
  report = inspect_source(config)
  assert report.counts == {"records": 4, "usable": 2, "skipped/not_an_image": 1,
                           "skipped/truncated": 1}
  d = report.to_dict()
  assert d["formats"] == {"JPEG": 1, "PNG": 1}
  assert d["side_histogram"]["< 64"] == 1 and d["side_histogram"]["224 - 384"] == 1
  assert d["aspect_histogram"][">= 4.00"] == 0 and d["aspect_histogram"]["2.00 - 4.00"] == 1
  assert d["captions_per_image"] == {"1": 1, "2": 1}
  assert sum(d["caption_words_histogram"].values()) == 2


def test_convert_tfrecord_keeps_several_captions_and_labels(tmp_path):
  pattern = tfrecord_files(str(tmp_path), num_files=1, per_file=3, captions_per_image=2)
  out = tmp_path / "ar"
  assert cli.main(["data", "convert", "--source", "tfrecord", "--files", pattern, "--out",
                   str(out)]) == 0
  source = ArrayRecordSource([str(p) for p in out.glob("*.array_record")])
  r = source[1]
  assert len(r["caption"]) == 2 and r["label"] == 1 and r["example_id"] == 1


# --- records whose fields are not where the config looks ----------------------------


def _inspect_error(capsys, source: str, files: str, *overrides: str) -> str:
  assert cli.main(["data", "inspect", "--source", source, "--files", files, *overrides]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_inspect_names_the_features_of_tfrecords_read_with_wrong_keys(tmp_path, capsys):
  pattern = tfrecord_files(str(tmp_path), num_files=1, per_file=3, caption_key="texts")
  err = _inspect_error(capsys, "tfrecord", pattern, "--config.data.example_keys.image=img")
  assert "skipped/missing_image: 3" in err
  assert ("they hold the features {'example_id': 'numbers', 'image/encoded': 'bytes', "
          "'image/format': 'bytes', 'label': 'numbers', 'texts': 'bytes'} "
          "(config.data.example_keys: image = 'img', caption = 'caption')") in err
  assert cli.main(["data", "inspect", "--source", "tfrecord", "--files", pattern]) == 0
  assert ("3 records without the configured image or caption hold the features "
          "{'example_id'") in capsys.readouterr().out


def test_inspect_names_the_tar_members_of_samples_without_an_image(tmp_path, capsys):
  write_tar(str(tmp_path / "s.tar"), [("k0.image", jpeg()), ("k0.caption", b"a cat"),
                                      ("k1.image", jpeg()), ("k1.caption", b"a dog")])
  err = _inspect_error(capsys, "webdataset", str(tmp_path / "s.tar"))
  assert "skipped/no_image: 2" in err
  assert "they hold the tar members KEY.{caption,image} (images are read from KEY.{jpg," in err


def test_the_training_error_names_the_features_the_records_hold(tiny_config, tmp_path):
  from navit_clip.data.counters import BadSourceError
  from navit_clip.data.pipeline import make_train_dataset

  config = tiny_config()
  config.data.source = "tfrecord"
  config.data.train_files = tfrecord_files(str(tmp_path), num_files=2, per_file=4,
                                           caption_key="alt_text")
  config.data.bad_check_min_records = 4
  with pytest.raises(BadSourceError, match=r"missing_caption: \d+\).*The unusable records "
                     r"hold the features \{.*'alt_text': 'bytes'.*\} \(config.data."
                     r"example_keys: image = 'image/encoded', caption = 'caption'\)"):
    next(iter(make_train_dataset(config)))


def test_arrayrecord_inspect_names_the_features_too(tmp_path, capsys):
  pattern = tfrecord_files(str(tmp_path), num_files=1, per_file=2)
  out = tmp_path / "ar"
  assert cli.main(["data", "convert", "--source", "tfrecord", "--files", pattern, "--out",
                   str(out)]) == 0
  capsys.readouterr()
  err = _inspect_error(capsys, "arrayrecord", str(out / "*.array_record"),
                       "--config.data.example_keys.image=jpeg")
  assert "'image/encoded': 'bytes'" in err and "image = 'jpeg'" in err
