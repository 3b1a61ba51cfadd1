"""navit_clip.storage against real servers on localhost: moto's S3 server, an HTTP server,
and pipe: commands; plus the tokenizer copy into the workdir."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import tarfile
import threading

import pytest

from navit_clip import storage
from navit_clip.data.counters import SKIP_KEY
from navit_clip.data.sources.paths import expand_paths, read_regular
from navit_clip.data.sources.webdataset import TarReader


def _shard(keys: list[str]) -> bytes:
  """A webdataset tar: KEY.jpg (fake image bytes) and KEY.txt per key."""
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w") as tar:
    for key in keys:
      for ext, data in (("jpg", f"img-{key}".encode()), ("txt", f"caption {key}".encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return out.getvalue()


def _captions(path: str) -> list[bytes]:
  return [r["caption"] for r, _ in TarReader().read(path, 0) if "caption" in r]


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
  """A moto S3 server on a free localhost port with bucket "bkt"; yields "s3://bkt"."""
  moto_server = pytest.importorskip("moto.server")
  server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
    monkeypatch_module.setenv(k, v)
  import boto3

  boto3.client("s3").create_bucket(Bucket="bkt")
  yield "s3://bkt"
  server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
  """A folder served by http.server on a free localhost port: (folder, base URL)."""
  root = tmp_path_factory.mktemp("www")
  handler = functools.partial(_QuietHandler, directory=str(root))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield root, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def test_scheme_and_join():
  assert storage.scheme("a/b") == "" and storage.scheme("/x") == ""
  assert storage.scheme("S3://b/k") == "s3" and storage.scheme("pipe:cat x") == "pipe"
  assert storage.join("gs://b/run/", "checkpoints") == "gs://b/run/checkpoints"
  assert storage.join("run", "x") == os.path.join("run", "x")


def test_local_write_atomic_and_append(tmp_path):
  path = str(tmp_path / "m.jsonl")
  storage.write_atomic(path, "a\n")
  log = storage.AppendFile(path)
  log.write("b\n")
  log.close()
  assert open(path).read() == "a\nb\n" and not os.path.exists(path + ".tmp")


def test_pipe_shard_reads_and_failed_command_is_an_oserror(tmp_path):
  shard = tmp_path / "s.tar"
  shard.write_bytes(_shard(["k0", "k1"]))
  assert _captions(f"pipe:cat {shard}") == [b"caption k0", b"caption k1"]
  with pytest.raises(OSError, match="exited with status"):
    storage.read_bytes("pipe:cat /nonexistent/file 2>/dev/null")


def test_forward_stream_refuses_seeking_back_past_its_lookback():
  f = storage.open_stream("pipe:head -c 3000000 /dev/zero")
  f.seek(2_500_000)
  f.read(10)
  with pytest.raises(io.UnsupportedOperation, match="cannot seek back"):
    f.seek(0)
  f.close()


def test_http_shards(http_root):
  root, url = http_root
  for i in range(2):
    (root / f"shard-{i:02d}.tar").write_bytes(_shard([f"s{i}a", f"s{i}b"]))
  paths = expand_paths(f"{url}/shard-{{00..01}}.tar")
  assert paths == [f"{url}/shard-00.tar", f"{url}/shard-01.tar"]
  assert [c for p in paths for c in _captions(p)] == [
      b"caption s0a", b"caption s0b", b"caption s1a", b"caption s1b"]
  with pytest.raises(ValueError, match="cannot be globbed"):
    storage.glob(f"{url}/*.tar")


def test_http_missing_shard_is_skipped_as_unreadable(http_root):
  _, url = http_root
  records = [r for r, _ in TarReader().read(f"{url}/missing.tar", 0)]
  assert [r.get(SKIP_KEY) for r in records] == ["unreadable_file"]


def test_s3_files(s3):
  storage.write_atomic(f"{s3}/f/a.txt", "hello")
  assert storage.exists(f"{s3}/f/a.txt") and storage.isfile(f"{s3}/f/a.txt")
  assert not storage.exists(f"{s3}/f/none.txt")
  assert storage.size(f"{s3}/f/a.txt") == 5 and storage.listdir(f"{s3}/f") == ["a.txt"]
  with storage.open(f"{s3}/f/b.txt", "w") as f:
    f.write("text")
  with storage.open(f"{s3}/f/b.txt", "r") as f:
    assert f.read() == "text"
  assert storage.glob(f"{s3}/f/*.txt") == [f"{s3}/f/a.txt", f"{s3}/f/b.txt"]
  storage.remove(f"{s3}/f/b.txt")
  assert not storage.exists(f"{s3}/f/b.txt")
  assert read_regular(f"{s3}/f/a.txt", 5) == b"hello"


def test_s3_webdataset_shards_by_pattern(s3):
  for i in range(3):
    storage.write_atomic(f"{s3}/wds/shard-{i:03d}.tar", _shard([f"k{i}"]))
  assert expand_paths(f"{s3}/wds/shard-{{000..001}}.tar,{s3}/wds/*2.tar") == [
      f"{s3}/wds/shard-000.tar", f"{s3}/wds/shard-001.tar", f"{s3}/wds/shard-002.tar"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    expand_paths(f"{s3}/wds/shard-009.tar")
  assert _captions(f"{s3}/wds/shard-001.tar") == [b"caption k1"]


def test_s3_metrics_append_across_runs_and_tensorboard_uploads(s3):
  from navit_clip.metrics import MetricsLogger

  run = f"{s3}/runs/metrics"
  for step in (1, 2):  # a second logger on the same workdir appends, as a resume does
    logger = MetricsLogger(run, 10, stream=io.StringIO())
    logger.log(step, {"loss": 1.0 / step})
    logger.close()
  rows = [json.loads(line) for line in storage.read_bytes(f"{run}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  events = storage.glob(f"{run}/tensorboard/events.out.tfevents.*")
  assert len(events) == 2 and all(storage.size(e) > 0 for e in events)
  assert not os.path.exists("s3:")


def test_tokenizer_from_s3_and_copied_into_the_workdir(s3, tmp_path):
  from navit_clip.config_defaults import default_config
  from navit_clip.evaluate.restore import load_config
  from navit_clip.text.tokenizer import Tokenizer, train_tokenizer
  from navit_clip.train import save_config

  captions = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("dot", "cross")] * 20
  train_tokenizer(captions, 19, f"{s3}/tok/t.model")
  assert Tokenizer(f"{s3}/tok/t.model", 8).vocab_size == 19
  config = default_config()
  config.data.tokenizer.path = f"{s3}/tok/t.model"
  workdir = tmp_path / "run"
  save_config(config, str(workdir))
  assert json.loads((workdir / "config.json").read_text())["data"]["tokenizer"]["path"] == (
      "tokenizer.model")
  moved = tmp_path / "moved"
  os.rename(workdir, moved)
  restored = load_config(str(moved)).data.tokenizer.path
  assert restored == str(moved / "tokenizer.model")
  assert Tokenizer(restored, 8).encode(["a red dot"]).tolist() == (
      Tokenizer(f"{s3}/tok/t.model", 8).encode(["a red dot"]).tolist())


def test_remote_training_workdir_is_refused_with_one_line(s3):
  from navit_clip.config_defaults import default_config
  from navit_clip.errors import UserError
  from navit_clip.train import train

  with pytest.raises(UserError, match="training checkpoints need a local workdir"):
    train(default_config(), f"{s3}/runs/train")
  assert not storage.exists(f"{s3}/runs/train/config.json")


def test_arrayrecord_refuses_urls(s3):
  from navit_clip.data.sources.arrayrecord import ArrayRecordSource

  with pytest.raises(ValueError, match="opens local files only"):
    ArrayRecordSource([f"{s3}/x.array_record"])
