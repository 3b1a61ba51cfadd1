"""Two processes of 4 CPU devices train exactly like one process of 8.

Both runs go through the real trainer on a tiny demo config, with the state sharded over
data x fsdp x model and the chunked sigmoid loss (texts passed round the ring across the
two processes). The processes talk through a coordinator on localhost and gloo collectives.
Every process reads the same global batches (config.data.shard_by_process = False) and
feeds its own rows of each, so both runs see the same examples in the same order.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from navit_clip import distributed
from navit_clip.config import default_config, validate

STEPS = 3
MESH = "data:2,fsdp:2,model:2"
RTOL = 1e-5  # the two layouts sum across devices in another order


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(tmp_path, tokenizer, name, devices, *dist_args, workdir=None):
  """Starts `_child_main` in a process; (the process, the path of its JSON result)."""
  out = tmp_path / f"{name}.json"
  workdir = workdir or tmp_path / name.split("-")[0]
  args = [sys.executable, __file__, tokenizer, str(workdir), str(out), str(devices),
          *map(str, dist_args)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  log = open(tmp_path / f"{name}.log", "w")
  return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), out


def test_cluster_environment_is_detected_from_the_environment():
  assert distributed.cluster_environment({}) is None
  assert distributed.cluster_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.cluster_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
  assert distributed.cluster_environment({"TPU_WORKER_HOSTNAMES": "t0"}) is None
  assert distributed.cluster_environment({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == "cloud_tpu"
  assert distributed.cluster_environment(
      {"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "JAX_COORDINATOR_ADDRESS"


def test_a_single_process_starts_nothing(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  c = default_config().distributed
  assert not distributed.initialize(c)
  c.initialize = "no"
  assert not distributed.initialize(c)


def test_data_share_is_the_jax_process_when_the_data_is_sharded_by_process(monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  d = default_config().data
  assert distributed.data_share(d) == {"process_index": 1, "process_count": 2}
  d.shard_by_process = False
  assert distributed.data_share(d) == {"process_index": 0, "process_count": 1}


def test_config_checks_the_coordinator_and_chunked_loss():
  c = default_config()
  c.distributed.coordinator = "localhost:1234"
  with pytest.raises(ValueError, match="distributed.coordinator"):
    validate(c)
  c = default_config()
  c.task, c.model.num_classes, c.loss.name = "classification", 3, "softmax_xent"
  c.loss.chunked = True
  with pytest.raises(ValueError, match="loss.chunked"):
    validate(c)
  c = default_config()
  c.mesh = "data:-1,model:x"
  with pytest.raises(ValueError, match="config.mesh"):
    validate(c)


@pytest.mark.slow
def test_two_processes_train_like_one(demo_tokenizer_path, tmp_path):
  port = _free_port()
  runs = [_start(tmp_path, demo_tokenizer_path, "single", 8)]
  runs += [_start(tmp_path, demo_tokenizer_path, f"multi-{i}", 4, f"localhost:{port}", 2, i)
           for i in range(2)]
  for (proc, _), name in zip(runs, ("single", "multi-0", "multi-1")):
    try:
      code = proc.wait(timeout=120)
    finally:
      proc.kill()
    assert code == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
  single, multi0, multi1 = (json.loads(out.read_text()) for _, out in runs)
  assert single["devices"] == multi0["devices"] == 8
  assert multi0["processes"] == multi1["processes"] == 2
  assert len(single["losses"]) == STEPS and np.all(np.isfinite(single["losses"]))
  np.testing.assert_allclose(multi0["losses"], single["losses"], rtol=RTOL)
  assert multi0["losses"] == multi1["losses"]


@pytest.mark.slow
def test_finite_data_ends_two_processes_at_the_same_step(demo_tokenizer_path, tmp_path):
  """Each process reads its own share of the records once, process 1's shorter (it counts
  20 records where process 0 counts 41): its share ends first, and both processes stop at
  that step, save, and exit 0 (without agreeing, process 0 would wait in the next step's
  collectives for ever)."""
  port = _free_port()
  runs = [_start(tmp_path, demo_tokenizer_path, f"multi-{i}", 4, f"localhost:{port}", 2, i,
                 1) for i in range(2)]
  for (proc, _), name in zip(runs, ("multi-0", "multi-1")):
    try:
      code = proc.wait(timeout=300)
    finally:
      proc.kill()
    assert code == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
  results = [json.loads(out.read_text()) for _, out in runs]
  assert results[0]["final_step"] == results[1]["final_step"] < 1000
  assert all(r["data_ended"] for r in results)


def _wait_all(tmp_path, runs, names, timeout):
  for (proc, _), name in zip(runs, names):
    try:
      code = proc.wait(timeout=timeout)
    finally:
      proc.kill()
    assert code == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
  return [json.loads(out.read_text()) for _, out in runs]


@pytest.mark.slow
def test_two_processes_checkpoint_on_gs_and_resume_like_one_unbroken_process(
    demo_tokenizer_path, tmp_path, gs, monkeypatch):
  """Both processes write their shards of each checkpoint to a gs:// workdir (the GCS
  emulator; Orbax through TensorStore's GCS driver, nothing staged locally), and two new
  processes resume from it: the losses are those of one unbroken process."""
  from navit_clip import storage

  monkeypatch.setenv("NAVIT_CLIP_CACHE", str(tmp_path / "cache"))
  workdir = f"{gs}/runs/two"
  port = _free_port()
  runs = [_start(tmp_path, demo_tokenizer_path, "single", 8, "", 0, -1, 0, 2 * STEPS)]
  runs += [_start(tmp_path, demo_tokenizer_path, f"first-{i}", 4, f"localhost:{port}", 2, i,
                  0, STEPS, workdir=workdir) for i in range(2)]
  single, first, _ = _wait_all(tmp_path, runs, ("single", "first-0", "first-1"), 300)
  assert storage.listdir(f"{workdir}/checkpoints") == [str(STEPS)]
  port = _free_port()
  runs = [_start(tmp_path, demo_tokenizer_path, f"second-{i}", 4, f"localhost:{port}", 2, i,
                 0, 2 * STEPS, workdir=workdir) for i in range(2)]
  second, _ = _wait_all(tmp_path, runs, ("second-0", "second-1"), 300)
  np.testing.assert_allclose(first["losses"] + second["losses"], single["losses"], rtol=RTOL)
  assert storage.listdir(f"{workdir}/checkpoints") == [str(STEPS), str(2 * STEPS)]
  assert not (tmp_path / "cache" / "checkpoints").exists()


def _child_main(tokenizer, workdir, out, devices, coordinator="", num_processes=0,
                process_id=-1, num_epochs=0, steps=STEPS):
  jax.config.update("jax_num_cpu_devices", int(devices))
  from conftest import tiny_demo_config
  from navit_clip.train import train

  epochs = int(num_epochs)
  config = tiny_demo_config(tokenizer, steps=1000 if epochs else int(steps))
  config.data.batch_size = 8
  config.data.shard_by_process = bool(epochs)
  config.data.num_epochs = epochs
  if epochs:
    config.data.num_train_examples = 41 if int(process_id) == 0 else 20
  config.train.log_every = 1
  config.mesh = MESH
  config.sharding.fsdp_min_size = 0
  config.loss.chunked = True
  config.distributed.coordinator = coordinator
  config.distributed.num_processes = int(num_processes)
  config.distributed.process_id = int(process_id)
  result = train(config, workdir)
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"losses": result.losses, "devices": jax.device_count(),
               "processes": jax.process_count(), "final_step": result.final_step,
               "data_ended": result.data_ended}, f)


if __name__ == "__main__":
  _child_main(*sys.argv[1:])
