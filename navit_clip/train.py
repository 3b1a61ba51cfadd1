"""The one trainer, for every task: contrastive (SigLIP / CLIP) and classification.

Reads top to bottom: config -> data -> model -> optimizer -> (resume, or start from another
run's parameters) -> compile the step once -> loop (next batch, step, log, checkpoint; stop
early on SIGTERM / SIGINT) -> final checkpoint. The step is
ahead-of-time compiled for the batch spec, so a batch of another shape is an error, not a
silent recompile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from navit_clip import config as config_lib
from navit_clip import distributed, init_from, nonfinite, sharding
from navit_clip import flops as flops_lib
from navit_clip.checkpoint import Checkpointer
from navit_clip.data.counters import data_counters
from navit_clip.evaluate.runner import run_evals, scalar_metrics
from navit_clip.losses import chunked_name
from navit_clip.metrics import MetricsLogger
from navit_clip.model import build_model
from navit_clip.optim import frozen_mask, make_optimizer, make_schedule
from navit_clip.preemption import PreemptionGuard
from navit_clip.data import pipeline


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


# Host-only fields of a packed batch: kept for tracing and export, never sent to devices.
HOST_ONLY_FIELDS = ("example_id",)


def _host_batch_stats(batch: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
  """(images, real tokens, total tokens) of a host batch."""
  seg = batch["segment_ids"]
  return int(batch["image_mask"].sum()), int((seg > 0).sum()), int(seg.size)


def _device_fields(batch: Mapping) -> dict:
  return {k: v for k, v in batch.items() if k not in HOST_ONLY_FIELDS}


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_name: str, accum_steps: int,
                    frozen) -> Callable:
  """The pure train step (state, batch) -> (state, metrics); state is a dict pytree.

  state = {"params": pure dict of float32 params, "opt_state": optax state, "step": int32}.
  `frozen` (bools like params) marks parameters that never train: the loss sees them
  through stop_gradient, so no backward pass is spent on them (LiT's locked image tower).
  A step with a non-finite loss or gradient leaves params and opt_state as they were and
  reports metrics["nonfinite"] = 1 (navit_clip.nonfinite).
  """

  def train_step(state, batch):
    def loss_fn(params):
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      model = nnx.merge(graphdef, params, rest)
      return model.loss(batch, loss_name)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    (params, opt_state), skipped = nonfinite.keep_if_finite(
        loss, grad_norm, (params, opt_state), (state["params"], state["opt_state"]))
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, nonfinite=skipped,
                   lr=schedule(state["step"] // accum_steps))
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  config_lib.validate(config)
  distributed.initialize(config.distributed)
  save_config(config, workdir)
  tc = config.train
  total_steps = tc.total_steps
  if total_steps < 1:
    raise ValueError(f"config.train.total_steps = {total_steps} must be >= 1")

  # Data: a Grain iterator of packed batches (host NumPy).
  dataset = pipeline.make_train_dataset(config)
  data_iter = iter(dataset)

  # Devices: the mesh; batch rows split over its ("data", "fsdp") axes.
  mesh = sharding.make_mesh(config.mesh)
  if config.data.batch_size % sharding.batch_shards(mesh):
    raise ValueError(f"config.data.batch_size = {config.data.batch_size} does not split over "
                     f"the {sharding.batch_shards(mesh)} data x fsdp devices of mesh "
                     f"{dict(mesh.shape)}")

  # Model and optimizer; the state is created sharded by the rules of config.sharding.
  model = build_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  updates_total = max(total_steps // config.optim.grad_accum_steps, 1)
  tx = make_optimizer(config.optim, params, updates_total)
  schedule = make_schedule(config.optim, updates_total)

  def init_state(params):
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  state_shardings = sharding.state_shardings(jax.eval_shape(init_state, params), mesh,
                                             config.sharding)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints,
                      keep_period=tc.keep_period or None, cleanup_tmp=True)
  resuming = ckpt.latest_step() is not None
  if config.init.checkpoint and not resuming:  # start from another run's parameters
    params = init_from.load_params(config.init, params, state_shardings["params"])
  state = jax.jit(init_state, out_shardings=state_shardings)(params)

  # Resume.
  start_step = 0
  if resuming:
    state = ckpt.restore(None, state, data_iter)
    start_step = int(state["step"])
    print(f"resumed from {ckpt.directory} at step {start_step}", flush=True)

  # Compile once for the batch spec and the shardings.
  loss_name = chunked_name(config.loss.name) if config.loss.chunked else config.loss.name
  step_fn = jax.jit(make_train_step(graphdef, rest, tx, schedule, loss_name,
                                    config.optim.grad_accum_steps,
                                    frozen_mask(config.optim, params)),
                    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=0)
  spec_batch = _device_fields({k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype)
                               in pipeline.batch_spec(config).shapes().items()})
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, spec_batch).compile()
  step_flops = flops_lib.compiled_flops(compiled)
  peak = tc.peak_flops or flops_lib.measure_matmul_peak()

  logger = MetricsLogger(workdir, total_steps, is_primary=jax.process_index() == 0,
                         tensorboard=tc.tensorboard)
  monitor = nonfinite.NonfiniteMonitor(tc.nonfinite, ckpt)  # per-step losses, NaN / Inf
  window = {"images": 0, "real": 0, "tokens": 0, "rows": 0, "wait": 0.0}
  t_window = time.perf_counter()
  step = start_step
  guard = PreemptionGuard().install()  # SIGTERM / SIGINT: save and stop after this step
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      batch = next(data_iter)
      window["wait"] += time.perf_counter() - t0
      images, real, tokens = _host_batch_stats(batch)
      window["images"] += images
      window["real"] += real
      window["tokens"] += tokens
      window["rows"] += batch["segment_ids"].shape[0]
      state, metrics = compiled(state, sharding.global_batch(_device_fields(batch), mesh,
                                                             config.data.batch_size))
      step += 1
      monitor.record(step, metrics)
      if step % tc.checkpoint_every == 0:
        monitor.check()  # a state from after a non-finite step is never saved in "stop" mode
        ckpt.save(step, state, data_iter)
      if config.evals and jax.process_count() == 1:
        t_eval = time.perf_counter()
        evals = run_evals(nnx.merge(graphdef, state["params"], rest), config, step, workdir)
        if evals:
          logger.log(step, scalar_metrics(evals), prefix="eval")
        t_window += time.perf_counter() - t_eval  # evaluation time is not training time
      if step % tc.log_every == 0 or step == total_steps:
        monitor.check()
        host = jax.device_get(metrics)
        elapsed = time.perf_counter() - t_window
        rows = batch["segment_ids"].shape[0]  # this process's share of the global batch
        n_steps, share = window["rows"] / rows, config.data.batch_size / rows
        out = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
        out.update(  # throughput of the whole run: this process's counts x processes
            images_per_s=window["images"] * share / elapsed,
            tokens_per_s=window["real"] * share / elapsed,
            padding=1.0 - window["real"] / max(window["tokens"], 1),
            images_per_row=window["images"] / max(window["rows"], 1),
            data_wait_frac=window["wait"] / elapsed,
            step_time=elapsed / n_steps,
            mfu=step_flops * n_steps / elapsed / peak,
            nonfinite_steps=monitor.skipped,
        )
        out.update({f"data/{k}": v for k, v in data_counters(data_iter).items()})
        logger.log(step, out)
        window = dict.fromkeys(window, 0)
        t_window = time.perf_counter()
      if guard.stop_requested(sync_point=step % tc.log_every == 0
                              or step % tc.checkpoint_every == 0):
        break
    monitor.check()
    ckpt.save_and_wait(step, state, data_iter)
    if guard.signal_name:
      print(f"stopped by {guard.signal_name} after step {step}; saved to {ckpt.directory}",
            flush=True)
  finally:
    ckpt.close()
    logger.close()
    guard.uninstall()
  final_model = nnx.merge(graphdef, state["params"], rest)
  return TrainResult(losses=monitor.losses, final_step=step, model=final_model,
                     workdir=workdir, stopped_by=guard.signal_name)
