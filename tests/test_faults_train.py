"""Faults around a training run: a preemption signal to the whole process group with Grain
workers, a killed main process, damaged checkpoints, a restart with a changed config, data
that runs out, and the metrics log across resumes.

The process tests run this file as a script in its own session (process group), its steps
slowed down so that a signal lands mid-run, with 2 Grain workers. Losses are compared
bitwise with an unbroken run (CPU, one device, same program; batches do not depend on the
worker count).
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

import pytest

from navit_clip import sharding
from navit_clip.checkpoint import Checkpointer, DamagedCheckpointError
from navit_clip.errors import UserError
from navit_clip.metrics import drop_rows_after
from navit_clip.train import train

STEPS = 12
STEP_SLEEP_S = 0.3  # in the subprocess only: room to signal it between steps
WORKERS = 2
DAMAGED_STEPS = 8  # the damage runs: checkpoints at 2, 4, 6, 8

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _config(tokenizer, *, workers: int = 0, steps: int = STEPS):
  from conftest import tiny_demo_config
  config = tiny_demo_config(tokenizer, steps=steps)
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 10
  config.data.num_workers = workers
  return config


@pytest.fixture(scope="module")
def unbroken(demo_tokenizer_path, tmp_path_factory):
  return train(_config(demo_tokenizer_path), str(tmp_path_factory.mktemp("unbroken")))


# -- Signals and process death, with Grain workers ---------------------------------------


def _stat(pid: int) -> list[str] | None:
  """The fields of /proc/PID/stat after the command name, or None if it is gone."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None


def _alive(pid: int) -> bool:
  fields = _stat(pid)
  return fields is not None and fields[0] != "Z"  # an unreaped zombie runs no more


def _workers_of(pid: int) -> list[int]:
  """The multiprocessing-spawned children (Grain workers) of process `pid`."""
  found = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    fields = _stat(int(entry))
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        spawned = b"spawn_main" in f.read()
    except OSError:
      continue
    if fields is not None and int(fields[1]) == pid and spawned:
      found.append(int(entry))
  return found


def _ignored_signals(pid: int) -> set[int]:
  with open(f"/proc/{pid}/status", encoding="utf-8") as f:
    mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
  return {sig for sig in range(1, 64) if mask >> (sig - 1) & 1}


def _last_logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  lines = open(path, encoding="utf-8").read().splitlines()
  return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _start(tokenizer, workdir) -> subprocess.Popen:
  """This file as a training script with WORKERS workers, in a new process group."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, __file__, tokenizer, str(workdir)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, workdir, step: int) -> list[int]:
  """Waits until the run has logged `step`; returns its worker processes."""
  deadline = time.monotonic() + 180
  while _last_logged_step(workdir) < step:
    if proc.poll() is not None or time.monotonic() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail(f"the run ended before step {step}: {proc.communicate()[0][-3000:]}")
    time.sleep(0.02)
  workers = _workers_of(proc.pid)
  assert len(workers) == WORKERS, workers
  return workers


def _wait_until_gone(pids: list[int], timeout_s: float) -> list[int]:
  """The processes of `pids` still running after up to `timeout_s` seconds."""
  deadline = time.monotonic() + timeout_s
  while any(map(_alive, pids)) and time.monotonic() < deadline:
    time.sleep(0.05)
  return [pid for pid in pids if _alive(pid)]


def _kill(pids: list[int]) -> None:
  for pid in pids:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


@linux_only
@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_exits_zero_and_resumes_exactly(
    demo_tokenizer_path, tmp_path, unbroken):
  workdir = tmp_path / "run"
  proc = _start(demo_tokenizer_path, workdir)
  workers = _wait_for_step(proc, workdir, 3)
  try:
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm's scancel or a TPU preemption does
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert _wait_until_gone(workers, timeout_s=10) == []
  finally:
    _kill(workers)
  stopped = _last_logged_step(workdir)
  assert 3 <= stopped < STEPS
  assert f"stopped by SIGTERM after step {stopped}" in output
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() == stopped
  resumed = train(_config(demo_tokenizer_path, workers=WORKERS), str(workdir))
  assert resumed.final_step == STEPS
  assert resumed.losses == unbroken.losses[stopped:]


@linux_only
@pytest.mark.slow
def test_the_workers_exit_when_the_main_process_is_killed(demo_tokenizer_path, tmp_path):
  workdir = tmp_path / "run"
  proc = _start(demo_tokenizer_path, workdir)
  workers = _wait_for_step(proc, workdir, 2)
  try:
    for worker in workers:  # the main process decides when to stop
      assert {signal.SIGINT, signal.SIGTERM} <= _ignored_signals(worker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert _wait_until_gone(workers, timeout_s=5) == []
  finally:
    _kill(workers)
    proc.stdout.close()


# -- Damaged checkpoints ----------------------------------------------------------------


@pytest.fixture(scope="module")
def damage_base(demo_tokenizer_path, tmp_path_factory):
  """An unbroken run with checkpoints at steps 2, 4, 6 and 8."""
  return train(_config(demo_tokenizer_path, steps=DAMAGED_STEPS),
               str(tmp_path_factory.mktemp("damage_base")))


def _copy_until(src, dst, step: int) -> str:
  """A copy of workdir `src` with its checkpoints after `step` removed."""
  shutil.copytree(src, dst)
  for name in os.listdir(os.path.join(dst, "checkpoints")):
    if int(name) > step:
      shutil.rmtree(os.path.join(dst, "checkpoints", name))
  return str(dst)


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


DAMAGE = {  # kind -> (damage to a step directory, what it is set aside as)
    "a flipped bit in an array file": (lambda d: _flip_a_bit(_largest_array_file(d)),
                                       "damaged"),
    "a truncated array file": (lambda d: _truncate(_largest_array_file(d)), "damaged"),
    "a deleted array file": (lambda d: os.remove(_largest_array_file(d)), "damaged"),
    "garbage array metadata": (lambda d: _write(os.path.join(d, "state", "_METADATA"), "{x"),
                               "damaged"),
    "garbage step metadata": (lambda d: _write(os.path.join(d, "_CHECKPOINT_METADATA"), "{x"),
                              "damaged"),
    "garbage iterator state": (
        lambda d: _write(os.path.join(d, "data", "process_0-of-1.json"), "{x"), "damaged"),
    "an edited iterator state": (_edit_iterator_state, "damaged"),
    "an empty step directory": (_empty, "incomplete"),
    "no commit marker": (lambda d: os.remove(os.path.join(d, "commit_success.txt")),
                         "incomplete"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(
    demo_tokenizer_path, damage_base, tmp_path, caplog, kind):
  damage, set_aside_as = DAMAGE[kind]
  workdir = _copy_until(damage_base.workdir, tmp_path / "run", 6)
  damage(os.path.join(workdir, "checkpoints", "6"))
  with caplog.at_level(logging.WARNING, logger="navit_clip.checkpoint"):
    resumed = train(_config(demo_tokenizer_path, steps=DAMAGED_STEPS), workdir)
  assert resumed.losses == damage_base.losses[4:], kind  # resumed at step 4
  [warning, *_] = [r.getMessage() for r in caplog.records if r.name == "navit_clip.checkpoint"]
  assert "checkpoint step 6 in" in warning and f"checkpoints is {set_aside_as}" in warning
  names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert names == ["2", "4", "6", f"6.{set_aside_as}", "8"]  # 6 saved again, anew


def test_no_intact_checkpoint_is_an_error_naming_each_step(tiny_config, tmp_path):
  config = tiny_config(steps=4)
  config.train.checkpoint_every = 2
  train(config, str(tmp_path))
  for step in ("2", "4"):
    _flip_a_bit(_largest_array_file(str(tmp_path / "checkpoints" / step)))
  with pytest.raises(DamagedCheckpointError,
                     match=r"no intact checkpoint in .*checkpoints: step 4: .*; step 2: "):
    train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing moved


# -- Restarts with another config --------------------------------------------------------


def test_a_restart_that_changes_the_model_is_refused_and_keeps_config_json(
    tiny_config, tmp_path, caplog):
  train(tiny_config(steps=4), str(tmp_path))
  saved = (tmp_path / "config.json").read_text()
  changed = tiny_config(steps=4)
  changed.model.image.variant = "mu/16"
  changed.data.batch_size = 8
  with pytest.raises(UserError, match=re.escape(
      "with config.data.batch_size (4 -> 8), config.model.image.variant ('mu/8' -> 'mu/16'):"
      " these shape the model")):
    train(changed, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == saved
  longer = tiny_config(steps=6)
  with caplog.at_level(logging.INFO, logger="navit_clip.train"):
    assert train(longer, str(tmp_path)).final_step == 6
  assert "config.train.total_steps (4 -> 6)" in caplog.text
  assert json.loads((tmp_path / "config.json").read_text())["train"]["total_steps"] == 6


# -- Data that ends ----------------------------------------------------------------------


def test_data_that_ends_saves_a_final_checkpoint_and_says_how_many_epochs(
    tiny_config, tmp_path, caplog):
  config = tiny_config(steps=100)
  config.data.num_epochs, config.data.num_train_examples = 2, 20
  with caplog.at_level(logging.WARNING, logger="navit_clip.train"):
    result = train(config, str(tmp_path))
  assert result.data_ended and 0 < result.final_step < 100
  assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == result.final_step
  assert (f"the training data ended after 2 epoch(s) (config.data.num_epochs), at step "
          f"{result.final_step} of 100") in caplog.text


# -- The metrics log ---------------------------------------------------------------------


def test_drop_rows_after_keeps_earlier_rows_and_drops_torn_ones(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 2)]
  path.write_text("\n".join(rows) + '\n{"step": 4, "lo')
  assert drop_rows_after(str(path), 2) == 2  # step 3 and the torn row
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]


def _child_main(tokenizer, workdir):
  feed = sharding.global_batch

  def slow_feed(*args):
    time.sleep(STEP_SLEEP_S)
    return feed(*args)

  sharding.global_batch = slow_feed
  result = train(_config(tokenizer, workers=WORKERS), workdir)
  print(f"final step {result.final_step}; stopped by {result.stopped_by}", flush=True)


if __name__ == "__main__":
  logging.basicConfig(level=logging.WARNING)
  _child_main(*sys.argv[1:])
