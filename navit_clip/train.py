"""The one trainer, for every task: contrastive (SigLIP / CLIP) and classification.

Reads top to bottom: `_setup` (config -> data -> mesh -> model -> optimizer -> state:
resumed, or started from another run's parameters -> the step compiled once), then the
loop of `train` (next batch, step, checkpoint, evaluate, log; stop early on SIGTERM /
SIGINT) and a final checkpoint. The step is ahead-of-time compiled for the batch spec, so
a batch of another shape is an error, not a silent recompile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from navit_clip import distributed, init_from, nonfinite, sharding
from navit_clip import flops as flops_lib
from navit_clip.checkpoint import Checkpointer
from navit_clip.choices import check_choice, check_range
from navit_clip.data import pipeline
from navit_clip.data.batch import device_fields
from navit_clip.data.counters import data_counters
from navit_clip.evaluate.runner import run_evals, scalar_metrics
from navit_clip.metrics import MetricsLogger
from navit_clip.model import build_model
from navit_clip.optim import frozen_mask, make_optimizer, make_schedule, merge_params, split_frozen
from navit_clip.preemption import PreemptionGuard
from navit_clip.throughput import Throughput

log = logging.getLogger(__name__)


def check_config(t: ml_collections.ConfigDict) -> None:
  """Checks config.train, the keys the trainer reads; raises ValueError naming the key."""
  for key in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    check_range(f"config.train.{key}", t[key], 1)
  check_range("config.train.keep_period", t.keep_period, 0)
  check_range("config.train.peak_flops", t.peak_flops, 0.0)
  check_choice("config.train.nonfinite", t.nonfinite, nonfinite.MODES)


@dataclasses.dataclass
class TrainResult:
  """What a finished run hands back: per-step losses, the final state and the model.

  `stopped_by` names the signal (SIGTERM, SIGINT) that stopped the run before total_steps,
  after saving a checkpoint at `final_step`; None when the run finished.
  """

  losses: list[float]
  final_step: int
  model: nnx.Module
  workdir: str
  stopped_by: str | None = None


@dataclasses.dataclass
class _Run:
  """What the loop starts from: data, mesh, checkpoints, the compiled step and its state."""

  data_iter: Iterator
  mesh: jax.sharding.Mesh
  ckpt: Checkpointer
  step_fn: Callable  # compiled: (state, global device batch) -> (state, metrics)
  step_flops: float  # XLA-counted FLOPs of one step
  state: dict  # {"params", "opt_state", "step"}, sharded
  start_step: int
  graphdef: nnx.GraphDef
  rest: nnx.State  # the model's non-parameter state

  def model(self, params: dict) -> nnx.Module:
    """The model with parameters `params` (a state's "params")."""
    return nnx.merge(self.graphdef, params, self.rest)


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, accum_steps: int, frozen) -> Callable:
  """The pure train step (state, batch) -> (state, metrics); state is a dict pytree.

  state = {"params": pure dict of float32 params, "opt_state": optax state of the trainable
  params, "step": int32}. `frozen` (bools like params, optim.frozen_mask) marks parameters
  that never train: the step splits them off (optim.split_frozen), differentiates and
  updates only the others, and hands the frozen ones back unchanged, so no backward pass
  and no optimizer state is spent on them (LiT's locked image tower). The loss is the
  model's own (`model.loss(batch)`). A step with a non-finite loss or gradient leaves
  params and opt_state as they were and reports metrics["nonfinite"] = 1
  (navit_clip.nonfinite).
  """

  def train_step(state, batch):
    trainable, fixed = split_frozen(state["params"], frozen)

    def loss_fn(trainable):
      return nnx.merge(graphdef, merge_params(trainable, fixed), rest).loss(batch)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new = optax.apply_updates(trainable, updates)
    (new, opt_state), skipped = nonfinite.keep_if_finite(
        loss, grad_norm, (new, opt_state), (trainable, state["opt_state"]))
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, nonfinite=skipped,
                   lr=schedule(state["step"] // accum_steps))
    return {"params": merge_params(new, fixed), "opt_state": opt_state,
            "step": state["step"] + 1}, metrics

  return train_step


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh of config.mesh; batch rows split over its ("data", "fsdp") axes."""
  mesh = sharding.make_mesh(config.mesh)
  if config.data.batch_size % sharding.batch_shards(mesh):
    raise ValueError(f"config.data.batch_size = {config.data.batch_size} does not split over "
                     f"the {sharding.batch_shards(mesh)} data x fsdp devices of mesh "
                     f"{dict(mesh.shape)}")
  return mesh


def _initial_state(config, ckpt: Checkpointer, init_state: Callable, params: dict,
                   shardings, data_iter) -> tuple[dict, int]:
  """(state, its step): created sharded, then resumed from `ckpt` if it has a checkpoint.

  A fresh run starts from `params`, or from config.init's run when that is set; a resumed
  one restores the state and `data_iter`'s position from `ckpt`'s latest checkpoint.
  """
  resuming = ckpt.latest_step() is not None
  if config.init.checkpoint and not resuming:  # start from another run's parameters
    params = init_from.load_params(config.init, params, shardings["params"])
  state = jax.jit(init_state, out_shardings=shardings)(params)
  if not resuming:
    return state, 0
  state = ckpt.restore(None, state, data_iter)
  start_step = int(state["step"])
  log.info("resumed from %s at step %d", ckpt.directory, start_step)
  return state, start_step


def _compile(step_fn, state: dict, config: ml_collections.ConfigDict, mesh):
  """`step_fn` compiled ahead of time for `state` and the device fields of the batch spec."""
  spec = device_fields({k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype)
                        in pipeline.batch_spec(config).shapes().items()})
  with jax.set_mesh(mesh):
    return step_fn.lower(state, spec).compile()


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Builds everything the loop needs (see the module docstring).

  Checks config.train only; the whole config is checked by navit_clip.config.validate,
  which the commands (navit_clip.cli, navit_clip.demo) run before they train.
  """
  check_config(config.train)
  distributed.initialize(config.distributed)
  save_config(config, workdir)
  data_iter = iter(pipeline.make_train_dataset(  # packed host NumPy batches
      config, **distributed.data_share(config.data)))
  mesh = _make_mesh(config)
  graphdef, params, rest = nnx.split(build_model(config, rngs=nnx.Rngs(config.seed)),
                                     nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  updates_total = max(config.train.total_steps // config.optim.grad_accum_steps, 1)
  tx = make_optimizer(config.optim, params, updates_total)
  frozen = frozen_mask(config.optim, params)  # never differentiated, never in the optimizer

  def init_state(params):
    return {"params": params, "opt_state": tx.init(split_frozen(params, frozen)[0]),
            "step": jnp.zeros((), jnp.int32)}

  shardings = sharding.state_shardings(jax.eval_shape(init_state, params), mesh,
                                       config.sharding)
  tc = config.train
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints,
                      keep_period=tc.keep_period or None, cleanup_tmp=True)
  state, start_step = _initial_state(config, ckpt, init_state, params, shardings, data_iter)
  schedule = make_schedule(config.optim, updates_total)
  step_fn = jax.jit(make_train_step(graphdef, rest, tx, schedule,
                                    config.optim.grad_accum_steps, frozen),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  compiled = _compile(step_fn, state, config, mesh)
  return _Run(data_iter, mesh, ckpt, compiled, flops_lib.compiled_flops(compiled), state,
              start_step, graphdef, rest)


def _evaluate(model: nnx.Module, config: ml_collections.ConfigDict, step: int, workdir: str,
              logger: MetricsLogger) -> None:
  """Runs the evaluations of config.evals due at `step` and logs their scalars."""
  evals = run_evals(model, config, step, workdir)
  if evals:
    logger.log(step, scalar_metrics(evals), prefix="eval")


def _train_record(metrics: Mapping, throughput: Throughput,
                  monitor: nonfinite.NonfiniteMonitor, data_iter) -> dict[str, float]:
  """A log step's record: the step's scalar metrics, throughput, skip counters."""
  out = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
  out.update(throughput.report())  # after the device sync: the window's steps are done
  out["nonfinite_steps"] = monitor.skipped
  out.update({f"data/{k}": v for k, v in data_counters(data_iter).items()})
  return out


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  run, tc, rows = _setup(config, workdir), config.train, config.data.batch_size
  state, step = run.state, run.start_step
  logger = MetricsLogger(workdir, tc.total_steps, is_primary=jax.process_index() == 0,
                         tensorboard=tc.tensorboard)
  monitor = nonfinite.NonfiniteMonitor(tc.nonfinite, run.ckpt)  # per-step losses, NaN / Inf
  throughput = Throughput(rows, run.step_flops,
                          tc.peak_flops or flops_lib.measure_matmul_peak())
  guard = PreemptionGuard().install()  # SIGTERM / SIGINT: save and stop after this step
  try:
    while step < tc.total_steps:
      t0 = time.perf_counter()
      batch = next(run.data_iter)
      throughput.add(batch, time.perf_counter() - t0)
      state, metrics = run.step_fn(state, sharding.global_batch(device_fields(batch),
                                                                run.mesh, rows))
      step += 1
      monitor.record(step, metrics)
      if step % tc.checkpoint_every == 0:
        monitor.check()  # a state from after a non-finite step is never saved in "stop" mode
        run.ckpt.save(step, state, run.data_iter)
      if config.evals and jax.process_count() == 1:
        with throughput.paused():  # evaluation time is not training time
          _evaluate(run.model(state["params"]), config, step, workdir, logger)
      if step % tc.log_every == 0 or step == tc.total_steps:
        monitor.check()
        logger.log(step, _train_record(metrics, throughput, monitor, run.data_iter))
        throughput.start()
      if guard.stop_requested(sync_point=step % tc.log_every == 0
                              or step % tc.checkpoint_every == 0):
        break
    monitor.check()
    run.ckpt.save_and_wait(step, state, run.data_iter)
    if guard.signal_name:
      log.warning("stopped by %s after step %d; saved to %s", guard.signal_name, step,
                  run.ckpt.directory)
  finally:
    run.ckpt.close()
    logger.close()
    guard.uninstall()
  return TrainResult(losses=monitor.losses, final_step=step, model=run.model(state["params"]),
                     workdir=workdir, stopped_by=guard.signal_name)
