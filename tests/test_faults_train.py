"""Faults around a training run: a preemption signal to the whole process group of
`navit-clip train` with Grain workers, a killed main process, damaged checkpoints and stray
step directories, a restart with a changed config, data that runs out, and the metrics log
across resumes.

Every run here is configs/demo.py shrunk to a tiny model (the overrides of `_overrides`, the
same on the command line and in process), STEPS steps, a log row each step and a checkpoint
every 2; they all compile the same step, once, into a persistent XLA cache that the
subprocesses share. Losses are compared bitwise with one unbroken run (CPU, one device, the
same program; batches do not depend on the worker count).
"""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from navit_clip.checkpoint import Checkpointer, DamagedCheckpointError
from navit_clip.config_loading import apply_overrides, load_config
from navit_clip.data import pipeline
from navit_clip.metrics import drop_rows_after
from navit_clip.train import check_resumable, train

STEPS = 12
WORKERS = 2
NAVIT_CLIP = os.path.join(os.path.dirname(sys.executable), "navit-clip")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _overrides(tokenizer: str, more: dict | None = None) -> list[str]:
  """KEY=VALUE overrides of configs/demo.py: conftest's tiny model, STEPS steps, a log row
  each step, a checkpoint every 2 (all kept), then `more`."""
  settings = {"model.image.variant": "mu/8", "model.text.variant": "mu",
              "data.tokenizer.path": tokenizer, "data.batch_size": 4, "data.seq_len": 64,
              "data.max_images": 6, "data.resolution.max_side": 48, "data.pack_window": 16,
              "data.num_workers": 0, "optim.warmup_steps": 2, "train.total_steps": STEPS,
              "train.log_every": 1,
              "train.checkpoint_every": 2, "train.keep_checkpoints": 10,
              "train.peak_flops": 1e11, "train.tensorboard": False, **(more or {})}
  return [f"{k}={v}" for k, v in settings.items()]


def _config(tokenizer: str, more: dict | None = None):
  """The config `navit-clip train --config demo` builds from the same overrides."""
  config = load_config("demo")
  apply_overrides(config, _overrides(tokenizer, more))
  return config


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
  """A persistent XLA cache for this file's runs, in process and (through the environment)
  in the subprocesses: the step is compiled once, then loaded."""
  from jax.experimental.compilation_cache import compilation_cache

  settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  saved = {k: getattr(jax.config, k) for k in settings}
  compilation_cache.reset_cache()  # jax decides on its first compile whether to use one
  for k, v in settings.items():
    jax.config.update(k, v)
  yield {k.upper(): str(v) for k, v in settings.items()}
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def unbroken(demo_tokenizer_path, tmp_path_factory):
  """The unbroken run: checkpoints at 2, 4, ..., 12 and a metrics row per step."""
  return train(_config(demo_tokenizer_path), str(tmp_path_factory.mktemp("unbroken")))


def _rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


def _last_logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  lines = open(path, encoding="utf-8").read().splitlines()
  return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _copy_until(src, dst, step: int) -> str:
  """A copy of workdir `src` with its checkpoints after `step` removed."""
  shutil.copytree(src, dst)
  for name in os.listdir(os.path.join(dst, "checkpoints")):
    if int(name) > step:
      shutil.rmtree(os.path.join(dst, "checkpoints", name))
  return str(dst)


# -- navit-clip train in its own process group -------------------------------------------


def _navit_clip_train(tokenizer, workdir, env: dict, more: dict | None = None
                      ) -> tuple[subprocess.Popen, str]:
  """`navit-clip train --config demo` in a new session (its own process group), its output
  to a log file; -> (the process, the log's path)."""
  log_path = f"{workdir}.log"
  args = [NAVIT_CLIP, "train", "--config", "demo", "--workdir", str(workdir),
          *(f"--config.{o}" for o in _overrides(tokenizer, more))]
  with open(log_path, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(args, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
  return proc, log_path


def _output(log_path: str) -> str:
  with open(log_path, encoding="utf-8") as f:
    return f.read()


def _tail(log_path: str) -> str:
  return _output(log_path)[-3000:]


def _stat(pid: int) -> list[str] | None:
  """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None


def _alive(pid: int) -> bool:
  fields = _stat(pid)
  return fields is not None and fields[0] != "Z"  # an unreaped zombie runs no more


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")
  except OSError:
    return ""


def _group(pgrp: int) -> list[int]:
  """The live processes of process group `pgrp`."""
  return [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
          if (fields := _stat(int(p))) is not None and fields[0] != "Z"
          and int(fields[2]) == pgrp]


def _workers_of(pid: int) -> list[int]:
  """The multiprocessing-spawned children (Grain workers) of process `pid`."""
  return [p for p in _group(pid) if (fields := _stat(p)) is not None
          and int(fields[1]) == pid and "spawn_main" in _cmdline(p)]


def _ignored_signals(pid: int) -> set[int]:
  with open(f"/proc/{pid}/status", encoding="utf-8") as f:
    mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
  return {sig for sig in range(1, 64) if mask >> (sig - 1) & 1}


def _wait_for_step(proc: subprocess.Popen, workdir, step: int, log_path: str) -> list[int]:
  """Waits until the run has logged `step`; returns its worker processes."""
  deadline = time.monotonic() + 300  # a loaded machine compiles slowly; a hang fails
  while _last_logged_step(workdir) < step:
    if proc.poll() is not None or time.monotonic() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail(f"the run ended before step {step}: {_tail(log_path)}")
    time.sleep(0.02)
  workers = _workers_of(proc.pid)
  assert len(workers) == WORKERS, workers
  return workers


def _still_running(pgrp: int, timeout_s: float) -> dict[int, str]:
  """{pid: command line} of the processes of group `pgrp` left after up to `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while _group(pgrp) and time.monotonic() < deadline:
    time.sleep(0.05)
  return {pid: _cmdline(pid) for pid in _group(pgrp)}


def _kill_group(pgrp: int) -> None:
  for pid in _group(pgrp):
    os.kill(pid, signal.SIGKILL)


@linux_only
@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_exits_0_and_resumes_exactly(
    demo_tokenizer_path, tmp_path, unbroken, xla_cache):
  workdir, with_workers = tmp_path / "run", {"data.num_workers": WORKERS}
  proc, log_path = _navit_clip_train(demo_tokenizer_path, workdir, xla_cache, with_workers)
  try:
    _wait_for_step(proc, workdir, 2, log_path)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm's scancel or a terminal's Ctrl-C does
    assert proc.wait(timeout=120) == 0, _tail(log_path)
    assert _still_running(proc.pid, timeout_s=10) == {}  # the workers too
  finally:
    _kill_group(proc.pid)
  stopped = _last_logged_step(workdir)
  assert 2 <= stopped < STEPS, _tail(log_path)
  assert f"stopped by SIGTERM after step {stopped}" in _output(log_path)
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() == stopped
  resumed = train(_config(demo_tokenizer_path, with_workers), str(workdir))
  assert resumed.final_step == STEPS
  assert resumed.losses == unbroken.losses[stopped:]
  rows = _rows(workdir)  # both attempts: each step once, the unbroken run's losses
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in rows] == unbroken.losses
  for count in ("images_seen", "tokens_seen"):  # counted from the start, not the restart
    assert [r[count] for r in rows] == [r[count] for r in _rows(unbroken.workdir)]


@linux_only
@pytest.mark.slow
def test_the_workers_exit_when_the_main_process_is_killed(demo_tokenizer_path, tmp_path,
                                                          xla_cache):
  workdir = tmp_path / "run"
  proc, log_path = _navit_clip_train(demo_tokenizer_path, workdir, xla_cache,
                                     {"data.num_workers": WORKERS})
  try:
    workers = _wait_for_step(proc, workdir, 1, log_path)
    for worker in workers:  # the main process decides when to stop
      assert {signal.SIGINT, signal.SIGTERM} <= _ignored_signals(worker)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert _still_running(proc.pid, timeout_s=5) == {}  # no orphaned worker (nor tracker)
  finally:
    _kill_group(proc.pid)


# -- Damaged checkpoints and stray step directories --------------------------------------


def _largest_array_file(step_dir: str) -> str:
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _flip_a_bit(path: str) -> None:
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
  os.truncate(path, os.path.getsize(path) // 2)


def _write(path: str, text: str) -> None:
  open(path, "w", encoding="utf-8").write(text)


def _empty(step_dir: str) -> None:
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def _edit_iterator_state(step_dir: str) -> None:
  """A valid JSON iterator state that is not the saved one (a digit changed)."""
  path = os.path.join(step_dir, "data", "process_0-of-1.json")
  text = open(path, encoding="utf-8").read()
  _write(path, re.sub(r'"next_key": (\d+)', lambda m: f'"next_key": {int(m[1]) + 1}', text, 1))


DAMAGE = {  # kind -> (damage to a step directory, what it is set aside as, the fault named)
    "a flipped bit in an array file": (lambda d: _flip_a_bit(_largest_array_file(d)),
                                       "damaged", "checksum mismatch in 1 array(s)"),
    "a truncated array file": (lambda d: _truncate(_largest_array_file(d)), "damaged",
                               "its state item cannot be read"),
    "a deleted array file": (lambda d: os.remove(_largest_array_file(d)), "damaged",
                             "its state item cannot be read"),
    "garbage array metadata": (lambda d: _write(os.path.join(d, "state", "_METADATA"), "{x"),
                               "damaged", "its state item cannot be read"),
    "garbage step metadata": (lambda d: _write(os.path.join(d, "_CHECKPOINT_METADATA"), "{x"),
                              "damaged", "_CHECKPOINT_METADATA cannot be read"),
    "garbage iterator state": (
        lambda d: _write(os.path.join(d, "data", "process_0-of-1.json"), "{x"), "damaged",
        "the data iterator state cannot be read"),
    "an edited iterator state": (_edit_iterator_state, "damaged",
                                 "checksum mismatch in the data iterator state"),
    "an empty step directory": (_empty, "incomplete", "no commit_success.txt"),
    "no commit marker": (lambda d: os.remove(os.path.join(d, "commit_success.txt")),
                         "incomplete", "no commit_success.txt"),
}


def _restore_latest(checkpoints: str, tokenizer: str, *, writer: bool = True):
  """The newest intact step of `checkpoints`, restored as the trainer restores it: the
  train state (its shapes read from step 2) and the data iterator's position."""
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().metadata(
      os.path.join(checkpoints, "2", "state")).item_metadata.tree
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  data_iter = iter(pipeline.make_train_dataset(_config(tokenizer)))
  ckpt = Checkpointer(checkpoints, writer=writer)
  try:
    return ckpt.restore(None, abstract, data_iter)
  finally:
    ckpt.close()


def _checkpoint_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.name == "navit_clip.checkpoint"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_kind_of_damage_to_the_latest_step_falls_back_to_the_one_before(
    demo_tokenizer_path, unbroken, tmp_path, caplog, kind):
  damage, set_aside_as, fault = DAMAGE[kind]
  checkpoints = os.path.join(_copy_until(unbroken.workdir, tmp_path / "run", 6),
                             "checkpoints")
  damage(os.path.join(checkpoints, "6"))
  with caplog.at_level(logging.WARNING, logger="navit_clip.checkpoint"):
    assert _restore_latest(checkpoints, demo_tokenizer_path).step == 4
  [warning, *_] = _checkpoint_warnings(caplog)
  assert f"checkpoint step 6 in {checkpoints} is {set_aside_as}" in warning, warning
  assert fault in warning, warning
  assert sorted(os.listdir(checkpoints)) == ["2", "4", f"6.{set_aside_as}"]


@pytest.mark.slow
def test_a_flipped_bit_makes_the_restart_resume_from_the_step_before(
    demo_tokenizer_path, unbroken, tmp_path, caplog):
  workdir = _copy_until(unbroken.workdir, tmp_path / "run", 6)  # metrics rows up to 12
  _flip_a_bit(_largest_array_file(os.path.join(workdir, "checkpoints", "6")))
  with caplog.at_level(logging.WARNING, logger="navit_clip.checkpoint"):
    resumed = train(_config(demo_tokenizer_path), workdir)
  [warning, *_] = _checkpoint_warnings(caplog)
  assert warning.startswith(f"checkpoint step 6 in {workdir}/checkpoints is damaged: "
                            "checksum mismatch in 1 array(s): "), warning
  assert resumed.losses == unbroken.losses[4:]  # resumed at step 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted(
      ["2", "4", "6", "6.damaged", "8", "10", "12"])  # 6 saved again, anew
  rows = _rows(workdir)  # rows 5..12 of the first attempt dropped, logged again
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in rows] == unbroken.losses


def test_stray_step_directories_are_ignored_and_set_aside(demo_tokenizer_path, unbroken,
                                                          tmp_path, caplog):
  checkpoints = os.path.join(_copy_until(unbroken.workdir, tmp_path / "run", STEPS),
                             "checkpoints")
  os.mkdir(os.path.join(checkpoints, "14"))  # empty
  shutil.copytree(os.path.join(checkpoints, "12"), os.path.join(checkpoints, "16"))
  os.remove(os.path.join(checkpoints, "16", "commit_success.txt"))  # a partial copy
  _write(os.path.join(checkpoints, "18"), "not a directory")
  assert Checkpointer(checkpoints).latest_step() == STEPS  # a reader skips them ...
  assert len(os.listdir(checkpoints)) == 9  # ... and moves nothing
  with caplog.at_level(logging.WARNING, logger="navit_clip.checkpoint"):
    assert _restore_latest(checkpoints, demo_tokenizer_path).step == STEPS
  assert sorted(n for n in os.listdir(checkpoints) if not n.isdigit()) == [
      "14.incomplete", "16.incomplete", "18.incomplete"]
  assert any("checkpoint step 16 in" in w and "incomplete (no commit_success.txt)" in w
             for w in _checkpoint_warnings(caplog))


def test_no_intact_checkpoint_is_an_error_naming_each_step_and_keeps_config_json(
    demo_tokenizer_path, unbroken, tmp_path):
  workdir = _copy_until(unbroken.workdir, tmp_path / "run", 4)
  for step in ("2", "4"):
    _flip_a_bit(_largest_array_file(os.path.join(workdir, "checkpoints", step)))
  saved = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  with pytest.raises(DamagedCheckpointError,
                     match=r"no intact checkpoint in .*checkpoints: step 4: .*; step 2: "):
    train(_config(demo_tokenizer_path, {"train.log_every": 3}), workdir)  # a change it allows
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # none moved
  assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == saved


# -- Restarts with another config --------------------------------------------------------


@pytest.mark.slow
def test_a_restart_that_changes_the_model_is_refused_in_one_line_and_keeps_config_json(
    demo_tokenizer_path, unbroken, tmp_path, xla_cache, caplog):
  workdir = _copy_until(unbroken.workdir, tmp_path / "run", STEPS)
  before = {name: open(os.path.join(workdir, name), "rb").read()
            for name in ("config.json", "metrics.jsonl")}
  proc, log_path = _navit_clip_train(
      demo_tokenizer_path, workdir, xla_cache,
      {"model.image.variant": "mu/16", "data.batch_size": 8})
  assert proc.wait(timeout=240) == 2, _tail(log_path)
  output = _output(log_path)
  [line] = [line for line in output.splitlines() if line.startswith("navit-clip: error:")]
  assert "Traceback" not in output, output
  assert line.startswith(f"navit-clip: error: cannot resume {workdir} with "
                         "config.data.batch_size (4 -> 8), config.model.image.variant "
                         "('mu/8' -> 'mu/16'): these shape the model"), line
  for name, content in before.items():
    assert open(os.path.join(workdir, name), "rb").read() == content, name
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == [
      str(s) for s in range(2, STEPS + 1, 2)]
  with caplog.at_level(logging.INFO, logger="navit_clip.train"):  # changes it can follow
    check_resumable(_config(demo_tokenizer_path, {"train.total_steps": 20}), workdir)
  assert "config.train.total_steps (12 -> 20)" in caplog.text


# -- Data that ends ----------------------------------------------------------------------


@pytest.mark.slow
def test_one_epoch_of_data_ends_the_run_with_exit_0_and_a_final_checkpoint(
    demo_tokenizer_path, tmp_path, xla_cache):
  workdir = tmp_path / "run"
  proc, log_path = _navit_clip_train(demo_tokenizer_path, workdir, xla_cache,
                                     {"data.num_epochs": 1, "data.num_train_examples": 20})
  assert proc.wait(timeout=240) == 0, _tail(log_path)
  ended = re.search(r"ran 1 epoch of the training data \(config.data.num_epochs\): it ended "
                    rf"at step (\d+) of {STEPS}; saved to ", _output(log_path))
  assert ended, _tail(log_path)
  final = int(ended[1])
  assert 0 < final < STEPS
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() == final
  assert [r["step"] for r in _rows(workdir)] == list(range(1, final + 1))


# -- The metrics log ---------------------------------------------------------------------


def test_drop_rows_after_keeps_earlier_rows_and_drops_torn_ones(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 2)]
  path.write_text("\n".join(rows) + '\n{"step": 4, "lo')
  assert drop_rows_after(str(path), 2) == 2  # step 3 and the torn row
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
