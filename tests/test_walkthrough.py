"""README.md's "Train on your own data" run as written, on tiny data, so it cannot rot.

The commands and my_config.py are taken from the section's code blocks. The only changes:
a tiny copy of the data (a few images with captions, as a folder and as webdataset
shards, and class folders for zero-shot), a vocabulary that such a corpus can fill, and
--config overrides that make the model tiny and the run a few steps long.
"""

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from navit_clip import cli

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
SECTION = "## Train on your own data"
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}
SHAPES = ("square", "bar")
TINY_VOCAB = "--vocab-size 16"
TINY_RUN = [  # the walk-through's recipe shrunk to a few CPU seconds
    "--config.model.image.variant=mu/8", "--config.model.text.variant=mu",
    "--config.model.image.dtype=float32", "--config.model.text.dtype=float32",
    "--config.data.batch_size=2", "--config.data.seq_len=64", "--config.data.max_images=4",
    "--config.data.resolution.min_side=16", "--config.data.resolution.max_side=48",
    "--config.data.token_drop.kind=none", "--config.data.num_workers=0",
    "--config.data.shuffle_window=4", "--config.data.pack_window=8",
    "--config.optim.warmup_steps=1", "--config.train.total_steps=2",
    "--config.train.log_every=1", "--config.train.peak_flops=1e11",
    "--config.train.tensorboard=false"]


def _section() -> str:
  with open(README, encoding="utf-8") as f:
    text = f.read()
  start = text.index(SECTION)
  end = text.find("\n## ", start + len(SECTION))
  return text[start:end if end > 0 else None]


def _blocks(kind: str) -> list[str]:
  return re.findall(rf"```{kind}\n(.*?)```", _section(), re.S)


def _commands(block: str) -> list[str]:
  """The block's command lines, continuation lines joined."""
  return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _image(color: str, shape: str, seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  h, w = (int(v) for v in rng.integers(24, 48, size=2))
  pixels = np.full((h, w, 3), 245, np.uint8)
  hh, ww = (h // 2, w // 2) if shape == "square" else (h - 4, max(w // 5, 2))
  pixels[(h - hh) // 2:(h + hh) // 2, (w - ww) // 2:(w + ww) // 2] = COLORS[color]
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def _tiny_data(root) -> None:
  """photos/ + captions.jsonl, shards/0000{0,1}.tar, val/<colour>/: a few images each."""
  items = [(c, s, i) for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES)]
  (root / "photos").mkdir()
  lines = []
  for c, s, i in items:
    (root / "photos" / f"{i}.png").write_bytes(_image(c, s, i))
    lines.append(json.dumps({"file": f"{i}.png", "caption": f"a {c} {s}"}))
  (root / "photos" / "captions.jsonl").write_text("\n".join(lines) + "\n")
  (root / "shards").mkdir()
  for shard in range(2):
    with tarfile.open(root / "shards" / f"{shard:05d}.tar", "w") as tar:
      for c, s, i in items[shard::2]:
        for name, data in ((f"{i:06d}.png", _image(c, s, i)),
                           (f"{i:06d}.txt", f"a {c} {s}".encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  for c in COLORS:
    (root / "val" / c).mkdir(parents=True)
    for j in range(2):
      (root / "val" / c / f"{j}.png").write_bytes(_image(c, SHAPES[j], 100 + j))


def _run(command: str, cwd) -> None:
  """One README command: navit-clip through its main(), anything else through bash."""
  command = command.replace("--vocab-size 8000", TINY_VOCAB)
  if command.startswith("navit-clip "):
    args = shlex.split(command)[1:]
    if args[0] == "train":
      args += TINY_RUN
    assert cli.main(args) == 0, command
    return
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
  subprocess.run(["bash", "-c", command], cwd=cwd, check=True, timeout=60,
                 env={**os.environ, "PATH": path})


def test_the_section_has_the_commands_it_promises():
  commands = [c for b in _blocks("bash") for c in _commands(b)]
  firsts = [" ".join(shlex.split(c)[:2]) for c in commands if c.startswith("navit-clip")]
  assert {"navit-clip data", "navit-clip tokenizer", "navit-clip train", "navit-clip eval",
          "navit-clip embed"} <= set(firsts)
  assert [b for b in _blocks("python") if b.startswith("# my_config.py\n")]
  assert all("--vocab-size 8000" in c for c in commands if "tokenizer train" in c)


def test_train_help_tells_how_to_point_it_at_your_data(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  for phrase in ("--config.data.source=folder", "webdataset", "--config.data.train_files=",
                 "--config.data.tokenizer.path=", "--config.data.example_keys.image=",
                 "navit-clip data inspect", "README.md, \"Train on your own data\""):
    assert phrase in text, phrase


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent XLA cache for this test only: the second training run loads the
  programs the first compiled (the same shapes), which halves the test's time."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  saved = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  compilation_cache.reset_cache()  # jax decides on its first compile whether to use one
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys,
                                                compilation_cache):
  _tiny_data(tmp_path)
  (config_block,) = [b for b in _blocks("python") if b.startswith("# my_config.py\n")]
  (tmp_path / "my_config.py").write_text(config_block)
  monkeypatch.chdir(tmp_path)
  folder_block, shards_block = _blocks("bash")
  for command in _commands(folder_block) + _commands(shards_block):
    _run(command, tmp_path)
  out = capsys.readouterr().out
  assert out.count("records 6: usable 6, unusable 0") == 2  # data inspect, each layout
  for run in ("photos", "shards"):
    rows = [json.loads(line) for line in open(tmp_path / "runs" / run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    report = json.loads((tmp_path / "runs" / run / "eval_step2.json").read_text())
    assert report["evals"]["cli_zeroshot"]["num_images"] == 6
  embedded = np.load(tmp_path / "photos_emb.npy")
  paths = [json.loads(line)["path"] for line in open(tmp_path / "photos_emb.jsonl")]
  assert embedded.shape[0] == 6 and [os.path.basename(p) for p in paths] == [
      f"{i}.png" for i in range(6)]
