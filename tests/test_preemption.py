"""A run killed or stopped at any step resumes to the same losses and parameters.

A training subprocess (this file run as a script, its steps slowed down so that a signal
lands mid-run) is killed with SIGKILL, or stopped with SIGTERM, once metrics.jsonl shows a
randomly chosen step; the run then resumes here. Its losses from the resumed step on, and
its final parameters, must equal the unbroken run's bitwise (CPU, one device, same
program).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from navit_clip import sharding
from navit_clip.checkpoint import Checkpointer
from navit_clip.preemption import PreemptionGuard
from navit_clip.train import train

STEPS = 16
STEP_SLEEP_S = 0.2  # in the subprocess only: room to signal it between steps


def _config(tokenizer):
  from conftest import tiny_demo_config
  config = tiny_demo_config(tokenizer, steps=STEPS)
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  return config


def _params(result) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.model, nnx.Param))]


@pytest.fixture(scope="module")
def unbroken(demo_tokenizer_path, tmp_path_factory):
  return train(_config(demo_tokenizer_path), str(tmp_path_factory.mktemp("unbroken")))


def _last_logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  lines = open(path, encoding="utf-8").read().splitlines()
  return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _run_until(tokenizer, workdir, step: int, sig: int) -> subprocess.Popen:
  """Starts a training subprocess and sends it `sig` once it has logged `step`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, __file__, tokenizer, str(workdir)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 300  # a loaded machine compiles slowly; a hang fails
  while _last_logged_step(workdir) < step:
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"the run ended before step {step}: {proc.communicate()[0][-3000:]}")
    time.sleep(0.02)
  proc.send_signal(sig)
  return proc


def _resume_and_compare(tokenizer, workdir, unbroken, context: str) -> None:
  start = Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() or 0
  resumed = train(_config(tokenizer), str(workdir))
  assert resumed.final_step == STEPS
  assert resumed.losses == unbroken.losses[start:], f"{context}, resumed at {start}"
  for got, want in zip(_params(resumed), _params(unbroken)):
    np.testing.assert_array_equal(got, want, err_msg=f"{context}, resumed at {start}")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]  # the rows logged after `start` went first
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), context
  assert [r["loss"] for r in rows] == unbroken.losses, context


def test_the_guard_records_sigint_and_restores_the_handler():
  before = signal.getsignal(signal.SIGINT)
  guard = PreemptionGuard().install()
  try:
    assert not guard.stop_requested(sync_point=False)
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag is set
    time.sleep(0.01)
    assert guard.stop_requested(sync_point=False) and guard.signal_name == "SIGINT"
  finally:
    guard.uninstall()
  assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_the_unbroken_run(
    demo_tokenizer_path, tmp_path, unbroken):
  kill_at = random.randint(3, STEPS - 4)
  proc = _run_until(demo_tokenizer_path, tmp_path, kill_at, signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  _resume_and_compare(demo_tokenizer_path, tmp_path, unbroken, f"killed at step >= {kill_at}")


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(demo_tokenizer_path, tmp_path,
                                                      unbroken):
  stop_at = random.randint(3, STEPS - 4)
  proc = _run_until(demo_tokenizer_path, tmp_path, stop_at, signal.SIGTERM)
  output = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, output[-3000:]
  stopped = _last_logged_step(tmp_path)
  assert stop_at <= stopped < STEPS
  assert f"stopped by SIGTERM after step {stopped}" in output
  assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == stopped
  _resume_and_compare(demo_tokenizer_path, tmp_path, unbroken, f"stopped at {stopped}")


def _child_main(tokenizer, workdir):
  feed = sharding.global_batch

  def slow_feed(*args):
    time.sleep(STEP_SLEEP_S)
    return feed(*args)

  sharding.global_batch = slow_feed
  result = train(_config(tokenizer), workdir)
  print(f"final step {result.final_step}; stopped by {result.stopped_by}", flush=True)


if __name__ == "__main__":
  _child_main(*sys.argv[1:])
