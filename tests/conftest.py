"""Shared fixtures: a demo tokenizer and tiny demo configs (CPU, seconds per run), and
object-store servers on localhost (tests/object_stores.py), one per test module."""

import pytest

import object_stores

from navit_clip.config_loading import load_config
from navit_clip.data.sources.demo import caption_corpus
from navit_clip.text.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def demo_tokenizer_path(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tokenizer") / "demo.model")
  train_tokenizer(caption_corpus(4000), 64, path, lowercase=True)
  return path


def tiny_demo_config(tokenizer_path: str, name: str = "demo", steps: int = 12):
  """configs/<name> shrunk to a few-second run: mu towers, short sequences."""
  c = load_config(name)
  c.model.image.variant = "mu/8"
  c.model.text.variant = "mu"
  c.data.tokenizer.path = tokenizer_path
  c.data.batch_size = 4
  c.data.seq_len = 64
  c.data.max_images = 6
  c.data.resolution.max_side = 48
  c.data.pack_window = 16
  c.data.num_workers = 0  # in process (the demo's own worker costs a start-up per run)
  c.optim.warmup_steps = 2
  c.train.total_steps = steps
  c.train.log_every = 4
  c.train.checkpoint_every = 1000
  c.train.peak_flops = 1e11  # skip the matmul measurement
  c.train.tensorboard = False
  return c


@pytest.fixture
def tiny_config(demo_tokenizer_path):
  return lambda name="demo", steps=12: tiny_demo_config(demo_tokenizer_path, name, steps)


@pytest.fixture(scope="session")
def trained_demo_workdir(demo_tokenizer_path, tmp_path_factory) -> str:
  """A workdir with a tiny demo model trained once per session (about 15 s on 2 cores).

  200 steps of 8 packed rows learn colour well above chance (~45% on 8 classes); shape
  barely. Its evaluations read 200 held-out images.
  """
  from navit_clip.train import train

  c = tiny_demo_config(demo_tokenizer_path, steps=200)
  c.data.batch_size = 8
  c.data.seq_len = 128
  c.data.max_images = 12
  c.data.num_eval_examples = 200
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.train.log_every = 100
  workdir = str(tmp_path_factory.mktemp("trained_demo"))
  train(c, workdir)
  return workdir


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
  """A moto S3 server on localhost with bucket "bkt"; yields "s3://bkt"."""
  with object_stores.s3_server(monkeypatch_module) as url:
    yield url


@pytest.fixture(scope="module")
def gs(monkeypatch_module):
  """gcp-storage-emulator on localhost with bucket "bkt"; yields "gs://bkt"."""
  with object_stores.gcs_server(monkeypatch_module) as url:
    yield url
