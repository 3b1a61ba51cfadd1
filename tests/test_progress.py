"""Long work logs its progress: records done, rate and ETA (navit_clip.data.progress), for
data convert / inspect, evaluation and embedding; training says that it compiles."""

import logging
import re

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_fixtures import webdataset_shards
from navit_clip.config import default_config
from navit_clip.data import progress
from navit_clip.data.convert import convert
from navit_clip.data.inspect import inspect_source

ETA = r", ETA \d+s$"


@pytest.fixture
def progress_lines(caplog, monkeypatch):
  """The progress lines logged, one per update (no pause between two lines)."""
  monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
  caplog.set_level(logging.INFO, logger="navit_clip")
  return lambda: [r.getMessage() for r in caplog.records if r.name == progress.__name__]


@pytest.fixture(scope="module")
def tiny(demo_tokenizer_path):
  from conftest import tiny_demo_config
  from navit_clip.model import build_model

  config = tiny_demo_config(demo_tokenizer_path)
  return config, build_model(config, rngs=nnx.Rngs(0))


def test_duration_reads_like_a_clock():
  assert [progress.duration(s) for s in (4.4, 65, 3600 * 2 + 7 * 60)] == ["4s", "1m05s",
                                                                         "2h07m"]


def _matching(pattern: str, lines: list[str]) -> list[str]:
  return [line for line in lines if re.match(pattern, line)]


def test_convert_and_inspect_log_done_rate_and_eta(tmp_path, progress_lines):
  pattern, _ = webdataset_shards(str(tmp_path), num_shards=2, per_shard=3)
  config = default_config()
  config.data.source, config.data.train_files = "webdataset", pattern
  convert(config, str(tmp_path / "ar"), log=lambda _: None)
  lines = progress_lines()
  assert _matching(r"data convert: 1/2 shards \(50%\), 3 records, [\d.]+ records/s" + ETA,
                   lines), lines
  assert re.match(r"data convert: done, 2/2 shards, 6 records, .* in \d+s$", lines[-1])
  inspect_source(config)  # a stream: files done, records read so far
  lines = progress_lines()
  assert _matching(r"data inspect: 1/2 files \(50%\), 4 records, .*" + ETA, lines), lines
  assert lines[-1].startswith("data inspect: done, 2/2 files, 6 records")
  config.data.source = "arrayrecord"
  config.data.train_files = str(tmp_path / "ar" / "*.array_record")
  inspect_source(config)  # random access: records of a known count
  lines = progress_lines()
  assert _matching(r"data inspect: 2/6 records \(33%\), [\d.]+ records/s" + ETA, lines)
  assert re.match(r"data inspect: done, 6/6 records, .* in \d+s$", lines[-1])


def test_eval_logs_records_read_rate_and_eta(tiny, progress_lines):
  from navit_clip.config import eval_config
  from navit_clip.evaluate.runner import run_evaluator

  config, model = tiny
  e = eval_config("zeroshot", "demo:color", max_examples=9, resolution="budget:16")
  assert run_evaluator("colour", e, model, config)["num_images"] == 9
  lines = progress_lines()
  assert _matching(r"eval demo:color at budget:16: 3/9 records \(33%\), [\d.]+ records/s"
                   + ETA, lines), lines
  assert lines[-1].startswith("eval demo:color at budget:16: done, 9/9 records")


def test_embed_logs_images_done_skipped_and_eta(tiny, tmp_path, progress_lines):
  from navit_clip.embedding_writer import export_image_embeddings
  from navit_clip.evaluate.embedder import Embedder
  from navit_clip.evaluate.files import ImageFiles
  from navit_clip.evaluate.inference_resolution import ResolutionPolicy

  config, model = tiny
  paths = []
  for i in range(5):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(np.full((16 + 4 * i, 20, 3), 40 * i, np.uint8)).save(paths[-1])
  (tmp_path / "1.png").write_bytes(b"not an image")
  export_image_embeddings(Embedder(model), config, ImageFiles(paths), str(tmp_path / "e"),
                          policy=ResolutionPolicy.parse("budget:16"), chunk=2)
  lines = progress_lines()
  assert _matching(r"embed images: 3/5 records \(60%\), 1 skipped, .*" + ETA, lines), lines
  assert lines[-1].startswith("embed images: done, 5/5 records, 1 skipped")


@pytest.mark.slow
def test_training_says_it_compiles_before_it_does(tiny_config, tmp_path, caplog,
                                                 monkeypatch):
  from navit_clip import train as train_lib

  caplog.set_level(logging.INFO, logger="navit_clip")
  logged_when_lowering = []  # the messages logged when the step is about to be lowered
  device_fields = train_lib.device_fields

  def spy(fields):
    if not logged_when_lowering:
      logged_when_lowering.extend(r.getMessage() for r in caplog.records)
    return device_fields(fields)

  monkeypatch.setattr(train_lib, "device_fields", spy)
  train_lib.train(tiny_config(steps=3), str(tmp_path / "run"))
  assert ("compiling the train step for batches of 4 rows x 64 patch tokens (mu/8 image "
          "tower, mu text tower) on 1 cpu device(s)") in logged_when_lowering[-1]
