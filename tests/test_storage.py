"""navit_clip.storage against real servers on localhost: moto's S3 server, the
gcp-storage-emulator GCS server, an HTTP server, and pipe: commands; plus the tokenizer copy
into the workdir, and embeddings and exports written to an object store."""

from __future__ import annotations

import functools
import glob
import http.server
import io
import json
import os
import re
import tarfile
import threading
import time

import numpy as np
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
  served: list[str] = []  # the paths of the GET requests, in order

  def do_GET(self):
    _QuietHandler.served.append(self.path)
    super().do_GET()

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


@pytest.mark.slow
@pytest.mark.parametrize("split, fetches", [("files", 1), ("records", 2)])
def test_two_workers_fetch_each_https_shard_once_when_they_split_files(http_root, tiny_config,
                                                                    split, fetches):
  """Training from http:// webdataset shards with 2 workers: with stream_split "files"
  (the default's choice here) each shard is downloaded once an epoch, not once a worker,
  and the epoch holds each record once."""
  from data_fixtures import webdataset_shards

  from navit_clip.data import pipeline

  root, url = http_root
  folder = root / f"wds_{split}"
  folder.mkdir()
  _, captions = webdataset_shards(str(folder), num_shards=4, per_shard=3)
  config = tiny_config()
  config.data.source, config.data.num_epochs = "webdataset", 1
  config.data.train_files = f"{url}/wds_{split}/shard-{{00000..00003}}.tar"
  config.data.num_workers, config.data.stream_split = 2, split
  _QuietHandler.served.clear()
  batches = list(pipeline.make_train_dataset(config))
  ids = sorted(i for b in batches for i in b["example_id"][b["image_mask"]].tolist())
  assert ids == sorted(captions)
  assert sorted(_QuietHandler.served) == sorted(
      f"/wds_{split}/shard-{s:05d}.tar" for s in range(4) for _ in range(fetches))


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
  from navit_clip.workdir import save_config

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


@pytest.mark.slow
def test_s3_training_workdir_saves_prunes_and_resumes_past_a_half_uploaded_step(
    s3, tiny_config, tmp_path, monkeypatch):
  from navit_clip.checkpoint_mirror import staging_dir
  from navit_clip.train import train

  config = tiny_config(steps=8)
  config.train.log_every, config.train.checkpoint_every = 1, 2
  config.train.keep_checkpoints = 3
  local = train(config, str(tmp_path / "local"))  # the unbroken run
  run, checkpoints = f"{s3}/runs/train", f"{s3}/runs/train/checkpoints"
  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache_a"))
  assert train(config, run).losses == local.losses
  assert storage.listdir(checkpoints) == ["4", "6", "8"]  # keep_checkpoints, remotely too
  assert all(storage.isfile(f"{checkpoints}/8/{name}") for name in
             ("commit_success.txt", "_CHECKPOINT_METADATA", "state/manifest.ocdbt"))
  storage.remove_tree(f"{checkpoints}/8")  # as if the run stopped while uploading step 6:
  storage.remove(f"{checkpoints}/6/commit_success.txt")  # its marker goes up last
  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache_b"))  # another machine
  staging = staging_dir(checkpoints)
  assert not os.path.exists(staging)
  resumed = train(config, run)  # downloads step 4 (6 is skipped), resumes there
  assert resumed.losses == local.losses[4:]
  assert sorted(os.listdir(staging)) == ["4", "6", "8"] and not os.path.exists("s3:")
  assert all(storage.isfile(f"{checkpoints}/{s}/commit_success.txt") for s in (4, 6, 8))
  rows = [json.loads(line) for line in storage.read_bytes(f"{run}/metrics.jsonl").splitlines()]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == list(range(1, 9))  # each step once
  assert [r["loss"] for r in train_rows] == local.losses


def test_arrayrecord_converted_to_s3_reads_as_the_local_shards(s3, tiny_config, tmp_path,
                                                              monkeypatch):
  """`data convert --out s3://...` uploads whole shards and resumes there; training reads
  ArrayRecord files on s3 through one local copy each: the batches of the local shards
  (before: refused, "the ArrayRecord reader opens local files only")."""
  from data_fixtures import webdataset_shards

  from navit_clip.data import pipeline
  from navit_clip.data.convert import convert

  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache"))
  config = tiny_config()
  config.data.num_epochs = 1
  config.data.source = "webdataset"
  config.data.train_files = webdataset_shards(str(tmp_path), num_shards=2, per_shard=5)[0]
  quiet = dict(records_per_shard=5, progress=False, log=lambda _: None)
  local_dir, remote_dir = tmp_path / "ar", f"{s3}/converted"
  assert convert(config, str(local_dir), **quiet) == {"records": 10, "written": 10}
  assert convert(config, remote_dir, **quiet) == {"records": 10, "written": 10}
  names = sorted(os.listdir(local_dir))
  assert storage.listdir(remote_dir) == names  # two shards and convert.json
  for name in names:
    if name.endswith(".array_record"):
      assert storage.read_bytes(f"{remote_dir}/{name}") == (local_dir / name).read_bytes()
  assert convert(config, remote_dir, **quiet) == {}  # resumed: every shard is there
  assert not glob.glob(str(tmp_path / "cache" / "convert" / "*"))  # nothing left behind
  batches = {}
  config.data.source = "arrayrecord"
  for where in (str(local_dir), remote_dir):
    config.data.train_files = f"{where}/*.array_record"
    batches[where] = list(pipeline.make_train_dataset(config))
  assert len(batches[remote_dir]) == len(batches[str(local_dir)]) > 0
  for a, b in zip(batches[str(local_dir)], batches[remote_dir]):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  copies = glob.glob(str(tmp_path / "cache" / "files" / "*" / "*.array_record"))
  assert len(copies) == 2
  first = {c: os.stat(c).st_mtime_ns for c in copies}
  config.data.train_files = f"{remote_dir}/*.array_record"
  list(pipeline.make_train_dataset(config))
  assert {c: os.stat(c).st_mtime_ns for c in copies} == first  # the copies serve again
  shard = next(n for n in names if n.endswith(".array_record"))
  storage.write_atomic(f"{remote_dir}/{shard}", b"rewritten, not an ArrayRecord file")
  monkeypatch.setattr(config.data, "max_bad_fraction", 1.0)
  source = pipeline.make_source(config, "train")  # the changed object is fetched again
  assert len(source) == 5 + 1  # the other shard's records and one unreadable-file marker


def test_gs_shards_and_files(gs):
  for i in range(2):
    storage.write_atomic(f"{gs}/wds/shard-{i:03d}.tar", _shard([f"g{i}"]))
  assert expand_paths(f"{gs}/wds/shard-{{000..000}}.tar,{gs}/wds/*1.tar") == [
      f"{gs}/wds/shard-000.tar", f"{gs}/wds/shard-001.tar"]
  assert _captions(f"{gs}/wds/shard-001.tar") == [b"caption g1"]
  assert storage.isfile(f"{gs}/wds/shard-000.tar") and storage.isdir(f"{gs}/wds")
  assert storage.listdir(f"{gs}/wds") == ["shard-000.tar", "shard-001.tar"]
  assert read_regular(f"{gs}/wds/shard-000.tar", 1 << 20) == _shard(["g0"])


def test_image_folder_and_glob_on_gs(gs, tmp_path):
  from navit_clip.evaluate.files import list_images

  names = _image_tree(tmp_path / "imgs")
  storage.upload_dir(str(tmp_path / "imgs"), f"{gs}/listed")
  assert list_images(f"{gs}/listed/") == [f"{gs}/listed/{n}" for n in names]
  assert list_images(f"{gs}/listed/sub/*.png") == [f"{gs}/listed/sub/0.png",
                                                   f"{gs}/listed/sub/c.png"]


def test_gs_metrics_workdir(gs):
  from navit_clip.metrics import MetricsLogger

  run = f"{gs}/runs/metrics"
  for step in (1, 2):
    logger = MetricsLogger(run, 10, stream=io.StringIO())
    logger.log(step, {"loss": 1.0 / step})
    logger.close()
  rows = [json.loads(line) for line in storage.read_bytes(f"{run}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert len(storage.glob(f"{run}/tensorboard/events.out.tfevents.*")) == 2
  assert not os.path.exists("gs:")


def test_gs_training_workdir_checkpoints_and_resumes(gs, tiny_config, tmp_path, monkeypatch):
  """A gs:// workdir (the emulator): Orbax writes the checkpoints there itself (TensorStore's
  GCS driver; nothing staged locally), and a resume on another machine (an empty cache)
  continues the unbroken run's losses."""
  from navit_clip.train import train

  config = tiny_config(steps=6)
  config.train.log_every, config.train.checkpoint_every = 1, 3
  local = train(config, str(tmp_path / "local"))
  run = f"{gs}/runs/train"
  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache_a"))
  config.train.total_steps = 3
  assert train(config, run).losses == local.losses[:3]
  assert storage.isfile(f"{run}/checkpoints/3/commit_success.txt")
  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache_b"))
  config.train.total_steps = 6
  assert train(config, run).losses == local.losses[3:]
  assert storage.listdir(f"{run}/checkpoints") == ["3", "6"]
  assert not any((tmp_path / cache / "checkpoints").exists() for cache in ("cache_a", "cache_b"))
  assert not os.path.exists("gs:")


def test_a_gs_checkpoint_writer_sets_an_incomplete_step_aside_there(gs):
  """A step without its commit marker (a save cut off) is moved aside on the store itself,
  out of the directory (where Orbax would delete it as an unfinished save of its own)."""
  from navit_clip.checkpoint import Checkpointer

  directory = f"{gs}/runs/cut/checkpoints"
  storage.write_atomic(f"{directory}/5/state/manifest.ocdbt", b"half a save")
  ckpt = Checkpointer(directory, writer=True)
  ckpt.close()
  assert not storage.exists(f"{directory}/5")
  assert storage.listdir(f"{directory}.set-aside") == ["5.incomplete"]
  assert storage.read_bytes(f"{directory}.set-aside/5.incomplete/state/manifest.ocdbt") == (
      b"half a save")


def test_a_multi_process_run_refuses_a_mirrored_checkpoint_directory(s3, monkeypatch):
  """One process uploads a mirror: several would race, so an s3:// checkpoint directory in
  a multi-process run is one line that names the ways that work."""
  import jax

  from navit_clip.checkpoint import Checkpointer
  from navit_clip.errors import UserError

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(UserError, match=r"s3://bkt/mp/checkpoints.*gs:// or a shared local"):
    Checkpointer(f"{s3}/mp/checkpoints", writer=True)


def test_import_into_s3_and_gs_workdirs_that_eval_and_init_read(s3, gs, imported_workdir,
                                                                 tmp_path, monkeypatch):
  """`import --workdir` on a store writes the workdir there (nothing local); restore_model
  (eval, embed, export) and config.init read it as the local one: gs:// straight through
  Orbax, s3:// through one downloaded step; its config names the tokenizer beside it."""
  import jax
  from flax import nnx

  from navit_clip import cli, init_from
  from navit_clip.data.pipeline import make_tokenizer
  from navit_clip.evaluate.restore import checkpoint_steps, load_config, restore_model

  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  local = restore_model(imported_workdir)
  want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(local.model, nnx.Param)))
  want_tokens = make_tokenizer(local.config).encode(["a photo of a cat"])
  for store in (s3, gs):
    run = f"{store}/imported"
    assert cli.main(["import", "--from", os.path.join(FIXTURES, "siglip"), "--workdir",
                     run]) == 0
    with storage.open(f"{run}/config.json", "r") as f:
      assert json.load(f)["data"]["tokenizer"]["path"] == "tokenizer.model"
    assert load_config(run).data.tokenizer.path == f"{run}/tokenizer.model"
    assert checkpoint_steps(run) == checkpoint_steps(imported_workdir) == [0]
    remote = restore_model(run)
    assert remote.workdir == run and remote.step == local.step
    got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(remote.model, nnx.Param)))
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(make_tokenizer(remote.config).encode(["a photo of a cat"]),
                                  want_tokens)
    state_dir, step = init_from.resolve_state_dir(run, -1)
    assert step == local.step
    assert state_dir.startswith(run if store == gs else str(tmp_path / "cache"))
    assert cli.main(["import", "--from", os.path.join(FIXTURES, "siglip"), "--workdir",
                     run]) == 2  # it holds checkpoints now
  assert sorted(os.listdir(tmp_path)) == ["cache"]  # no ./s3: or ./gs: folder
  staged = glob.glob(str(tmp_path / "cache" / "checkpoints" / "*"))
  assert len(staged) == 1  # the s3:// step, downloaded once for both readers


# --- folders, embeddings and exports on an object store -----------------------------

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "siglip")


@pytest.fixture(scope="module")
def imported_workdir(tmp_path_factory) -> str:
  """A workdir imported from the tiny SigLIP fixture (no training needed)."""
  from navit_clip import cli

  workdir = str(tmp_path_factory.mktemp("imported") / "work")
  assert cli.main(["import", "--from", os.path.join(FIXTURES, "siglip"), "--workdir",
                   workdir]) == 0
  return workdir


def _png(seed: int, size=(20, 28)) -> bytes:
  import numpy as np
  from PIL import Image

  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)).save(
      out, format="PNG")
  return out.getvalue()


def test_caption_and_class_folders_on_s3(s3):
  from navit_clip.config import default_config
  from navit_clip.data import pipeline

  for i in range(2):
    storage.write_atomic(f"{s3}/folder/img/{i}.png", _png(i))
    storage.write_atomic(f"{s3}/classes/{'cat' if i else 'dog'}/{i}.png", _png(i))
  storage.write_atomic(f"{s3}/folder/meta/train.tsv", "filepath\ttitle\nimg/0.png\ta dot\n"
                       f"{s3}/folder/img/1.png\ta cross\n../secret.png\tx\n")
  config = default_config()
  config.data.csv_separator, config.data.image_root = "\\t", f"{s3}/folder"
  source = pipeline.make_source(config, "train", "folder", f"{s3}/folder/meta/train.tsv")
  records = [source[i] for i in range(len(source))]
  assert [r.get("caption", r.get(SKIP_KEY)) for r in records] == ["a dot", "a cross",
                                                                  "unsafe_path"]
  assert records[1]["image"] == _png(1)
  classes = pipeline.make_source(config, "train", "class_folders", f"{s3}/classes")
  assert classes.classnames == ("cat", "dog")
  assert [classes[i]["label"] for i in range(2)] == [0, 1]


def test_coco_and_karpathy_annotations_and_prompt_files_on_s3(s3):
  """Eval annotation files, their images beside them, and class name / template lists are
  read from the store like local ones."""
  from navit_clip.config import default_config
  from navit_clip.evaluate.datasets import load_eval_data
  from navit_clip.evaluate.prompts import load_classnames, load_templates

  for i in range(2):
    storage.write_atomic(f"{s3}/coco/val/{i}.png", _png(i))
  coco = {"images": [{"id": 7, "file_name": "val/1.png"}, {"id": 3, "file_name": "val/0.png"}],
          "annotations": [{"image_id": 3, "caption": "a dot"},
                          {"image_id": 7, "caption": "a cross"}]}
  storage.write_atomic(f"{s3}/coco/captions.json", json.dumps(coco))
  karpathy = {"images": [{"filepath": "val", "filename": "1.png", "split": "test",
                          "sentences": [{"raw": "a cross"}]}]}
  storage.write_atomic(f"{s3}/coco/karpathy.json", json.dumps(karpathy))
  data = load_eval_data(f"coco:{s3}/coco/captions.json", default_config())
  assert [data.source[i]["image"] for i in range(2)] == [_png(0), _png(1)]
  assert data.captions == {0: ["a dot"], 1: ["a cross"]}
  data = load_eval_data(f"karpathy:{s3}/coco/karpathy.json", default_config())
  assert data.source[0]["image"] == _png(1) and data.captions == {0: ["a cross"]}
  storage.write_atomic(f"{s3}/prompts/classes.txt", "dot\n# comment\ncross\n")
  storage.write_atomic(f"{s3}/prompts/templates.json", json.dumps(["a photo of a {}."]))
  assert load_classnames(f"{s3}/prompts/classes.txt") == ["dot", "cross"]
  assert load_templates(f"{s3}/prompts/templates.json") == ["a photo of a {}."]
  with pytest.raises(FileNotFoundError, match="neither a shipped list"):
    load_classnames(f"{s3}/prompts/missing.txt")


@pytest.mark.parametrize("command", ["demo", "study"])
def test_demo_and_study_refuse_an_object_store_workdir_in_one_line(tmp_path, monkeypatch,
                                                                  capsys, command):
  """Their reports and plots are local files: a URL workdir is refused before any work (it
  made a local ./gs: folder before)."""
  from navit_clip import cli

  monkeypatch.chdir(tmp_path)
  assert cli.main([command, "--workdir", "gs://bkt/run"]) == 2
  err = capsys.readouterr().err
  assert "writes its report and plots into a local folder" in err and len(err.splitlines()) == 1
  assert os.listdir(tmp_path) == []


def test_run_chunks_on_s3_resumes_and_leaves_no_parts(s3):
  import numpy as np

  from navit_clip.embedding_writer import run_chunks

  calls = []

  def compute(start, stop):
    calls.append(start)
    if start == 4 and len(calls) == 3:
      raise KeyboardInterrupt  # the run is stopped in its third chunk
    rows = np.arange(start, stop, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return rows, [{"index": i} for i in range(start, stop)], []

  out = f"{s3}/emb/resumed"
  with pytest.raises(KeyboardInterrupt):
    run_chunks(5, compute, out, chunk=2)
  assert storage.exists(f"{out}.parts/{0:012d}.npy")
  summary = run_chunks(5, compute, out, chunk=2)
  assert calls == [0, 2, 4, 4] and summary["rows"] == 5
  emb = np.load(io.BytesIO(storage.read_bytes(f"{out}.npy")))
  assert emb[:, 0].tolist() == [0, 1, 2, 3, 4]
  assert not storage.exists(f"{out}.parts")


@pytest.mark.slow
def test_embed_and_export_to_s3(s3, imported_workdir, tmp_path):
  import numpy as np

  from navit_clip import cli
  from navit_clip.serving_export import load_export

  storage.write_atomic(f"{s3}/in/texts.txt", "a red dot\na blue cross\n")
  assert cli.main(["embed", "--workdir", imported_workdir, "--texts", f"{s3}/in/texts.txt",
                   "--out", f"{s3}/emb/texts", "--no-progress"]) == 0
  texts = np.load(io.BytesIO(storage.read_bytes(f"{s3}/emb/texts.npy")))
  assert texts.shape[0] == 2 and [json.loads(x)["text"] for x in storage.read_bytes(
      f"{s3}/emb/texts.jsonl").splitlines()] == ["a red dot", "a blue cross"]
  for i in range(3):
    (tmp_path / f"{i}.png").write_bytes(_png(i))
  assert cli.main(["embed", "--workdir", imported_workdir, "--images", str(tmp_path),
                   "--out", f"{s3}/emb/images", "--chunk", "2", "--no-progress"]) == 0
  assert np.load(io.BytesIO(storage.read_bytes(f"{s3}/emb/images.npy"))).shape[0] == 3
  assert not storage.exists(f"{s3}/emb/images.parts")

  out = f"{s3}/exports/siglip"
  export = ["export", "--workdir", imported_workdir, "--out", out, "--platforms", "cpu"]
  assert cli.main(export) == 0
  assert storage.listdir(out) == ["export.json", "image_encoder.jax_export",
                                  "text_encoder.jax_export", "tokenizer.model"]
  assert cli.main(export) == 2  # not empty: refused
  assert cli.main(export + ["--overwrite", "--tf"]) == 0  # the SavedModel goes up too
  assert storage.isfile(f"{out}/saved_model/saved_model.pb")
  served = load_export(out)
  assert served.manifest["platforms"] == ["cpu"]
  np.testing.assert_allclose(served.embed_texts(["a red dot", "a blue cross"]), texts,
                             atol=1e-5)
  assert not os.path.exists("s3:")


def _image_tree(root) -> list[str]:
  """PNGs of three sizes in folder `root` and its subfolder, and a file that is no image;
  the images' relative paths in the order a folder listing gives them."""
  (root / "sub").mkdir(parents=True)
  names = ["a.png", "b.png", "sub/c.png"]
  for seed, name in enumerate(names):
    (root / name).write_bytes(_png(seed, (16 + 8 * seed, 40 - 6 * seed)))
  (root / "notes.md").write_text("not an image")
  (root / "sub" / "0.png").write_bytes(b"not a png either")
  return ["a.png", "b.png", "sub/0.png", "sub/c.png"]


def test_image_folders_globs_and_lists_on_s3(s3, tmp_path):
  from navit_clip.evaluate.files import ImageFiles, list_images

  names = _image_tree(tmp_path / "imgs")
  storage.upload_dir(str(tmp_path / "imgs"), f"{s3}/listed")
  assert list_images(str(tmp_path / "imgs")) == [str(tmp_path / "imgs" / n) for n in names]
  for spec in (f"{s3}/listed", f"{s3}/listed/"):  # recursive, a folder's files first
    assert list_images(spec) == [f"{s3}/listed/{n}" for n in names]
  assert list_images(f"{s3}/listed/*.png") == [f"{s3}/listed/a.png", f"{s3}/listed/b.png"]
  assert list_images(f"{s3}/listed/{{b,sub/c}}.png") == [f"{s3}/listed/b.png",
                                                          f"{s3}/listed/sub/c.png"]
  assert list_images(f"{s3}/listed/sub/c.png") == [f"{s3}/listed/sub/c.png"]
  storage.write_atomic(f"{s3}/listed/list.txt", f"sub/c.png\n\n{s3}/listed/a.png\n")
  assert list_images(f"{s3}/listed/list.txt") == [f"{s3}/listed/sub/c.png",
                                                  f"{s3}/listed/a.png"]
  for spec in (f"{s3}/nothing/", f"{s3}/listed/*.jpg", f"{s3}/listed/{{x,y}}.png"):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no images found for '{spec}'")):
      list_images(spec)
  records = ImageFiles([f"{s3}/listed/missing.png", f"{s3}/listed/b.png"],
                       max_file_bytes=100)
  assert [records[i].get(SKIP_KEY) for i in range(2)] == ["unreadable", "oversized_file"]


def _embedded(workdir: str, spec: str, out: str):
  """`embed --images spec --out out`: (embeddings, each row's path)."""
  import numpy as np

  from navit_clip import cli

  assert cli.main(["embed", "--workdir", workdir, "--images", spec, "--out", out,
                   "--no-progress"]) == 0
  rows = [json.loads(x) for x in storage.read_bytes(f"{out}.jsonl").splitlines()]
  return np.load(io.BytesIO(storage.read_bytes(f"{out}.npy"))), [r["path"] for r in rows]


@pytest.mark.slow
def test_embed_images_from_an_s3_folder_equal_the_local_folder(s3, imported_workdir,
                                                                tmp_path):
  import numpy as np

  local = tmp_path / "imgs"
  names = _image_tree(local)
  storage.upload_dir(str(local), f"{s3}/embedded")
  want, want_paths = _embedded(imported_workdir, str(local), str(tmp_path / "local"))
  assert want.shape[0] == 3 and want_paths == [str(local / n) for n in names if n != "sub/0.png"]
  got, paths = _embedded(imported_workdir, f"{s3}/embedded/", f"{s3}/emb/from_s3")
  assert paths == [f"{s3}/embedded/{n}" for n in names if n != "sub/0.png"]
  np.testing.assert_allclose(got, want, atol=1e-6)
  skipped = [json.loads(x) for x in storage.read_bytes(f"{s3}/emb/from_s3.skipped.jsonl"
                                                       ).splitlines()]
  assert skipped == [{"index": 2, "path": f"{s3}/embedded/sub/0.png", "reason": "not_an_image"}]


@pytest.mark.slow
def test_an_export_on_s3_loads_back_and_embeds_as_the_local_one(s3, imported_workdir,
                                                                 tmp_path):
  import numpy as np

  from navit_clip import cli
  from navit_clip.evaluate.files import ImageFiles, list_images
  from navit_clip.serving_export import load_export

  for out in (str(tmp_path / "export"), f"{s3}/exports/loaded"):
    assert cli.main(["export", "--workdir", imported_workdir, "--out", out,
                     "--platforms", "cpu"]) == 0
  local, remote = load_export(str(tmp_path / "export")), load_export(f"{s3}/exports/loaded")
  assert remote.manifest == local.manifest and remote.spec == local.spec
  texts = ["a red dot", "a blue cross", "two green squares"]
  want = local.embed_texts(texts)
  assert want.shape == (3, local.manifest["embedding_dim"])
  np.testing.assert_allclose(remote.embed_texts(texts), want, atol=1e-6)
  _image_tree(tmp_path / "imgs")
  batch = next(local.image_batches(ImageFiles(list_images(str(tmp_path / "imgs")))))
  want = local.images(batch)
  assert want.shape[:2] == (local.spec.batch_size, local.spec.max_images)
  assert np.abs(want[batch["image_mask"]]).sum() > 0
  np.testing.assert_allclose(remote.images(batch), want, atol=1e-6)


def test_a_finished_save_reaches_s3_while_training_goes_on(s3, tmp_path, monkeypatch):
  """The upload of a mirrored save starts once Orbax has written it, without a further call
  (before: only at the next save or wait, so a run killed between saves had not uploaded
  its last one), and `wait` returns with the step on the remote."""
  import jax.numpy as jnp

  from navit_clip.checkpoint import Checkpointer

  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache"))
  remote = f"{s3}/runs/background/checkpoints"
  ckpt = Checkpointer(remote, writer=True)
  state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.int32(1)}
  assert ckpt.save(1, state)
  deadline = time.monotonic() + 30
  while not storage.isfile(f"{remote}/1/commit_success.txt"):
    assert time.monotonic() < deadline, "step 1 was not uploaded without another call"
    time.sleep(0.2)
  assert ckpt.save(2, {**state, "step": jnp.int32(2)})
  ckpt.wait()
  assert storage.isfile(f"{remote}/2/commit_success.txt")
  ckpt.close()
  restored = Checkpointer(remote).restore(None, state)
  assert int(restored.state["step"]) == 2
