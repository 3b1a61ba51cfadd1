"""The one trainer, for every task: contrastive (SigLIP / CLIP) and classification.

Reads top to bottom: `_setup` (config -> data -> mesh -> model -> optimizer -> state:
resumed, or started from another run's parameters -> the step compiled once), then the
loop of `train` (next batch, step, checkpoint, evaluate, log; stop early on SIGTERM /
SIGINT or when the data ends) and a final checkpoint. The step is ahead-of-time compiled
for the batch spec, so a batch of another shape is an error, not a silent recompile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from navit_clip import distributed, init_from, losses, nonfinite, optim, sharding, storage
from navit_clip import flops as flops_lib
from navit_clip.checkpoint import Checkpointer
from navit_clip.choices import check_choice, check_range
from navit_clip.data import pipeline
from navit_clip.data.batch import device_fields
from navit_clip.data.counters import data_counters
from navit_clip.data.preprocess import shrunk_share
from navit_clip.errors import UserError, as_user_errors
from navit_clip.evaluate.runner import run_evals, scalar_metrics
from navit_clip.metrics import MetricsLogger
from navit_clip.model import build_model
from navit_clip.optim import frozen_mask, make_optimizer, make_schedule, merge_params, split_frozen
from navit_clip.preemption import PreemptionGuard
from navit_clip.throughput import Throughput
from navit_clip.workdir import WORKDIR_TOKENIZER, save_config

log = logging.getLogger(__name__)

# What a resumed run cannot change: these shape the model, the optimizer state or the data
# stream that its checkpoints hold (a key stands for itself and every key below it).
RESUME_FIXED_KEYS = ("task", "model", "loss.name", "optim.name", "optim.lr_mults",
                     "optim.grad_accum", "optim.grad_accum_steps", "data.source",
                     "data.train_files", "data.mixture", "data.num_workers",
                     "data.stream_split", "data.batch_size", "data.seq_len",
                     "data.max_images", "data.packer")


def check_config(t: ml_collections.ConfigDict) -> None:
  """Checks config.train, the keys the trainer reads; raises ValueError naming the key."""
  for key in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    check_range(f"config.train.{key}", t[key], 1)
  check_range("config.train.keep_period", t.keep_period, 0)
  check_range("config.train.peak_flops", t.peak_flops, 0.0)
  check_choice("config.train.nonfinite", t.nonfinite, nonfinite.MODES)
  check_range("config.train.max_consecutive_nonfinite", t.max_consecutive_nonfinite, 1)


@dataclasses.dataclass
class TrainResult:
  """What a finished run hands back: per-step losses, the final state and the model.

  `stopped_by` names the signal (SIGTERM, SIGINT) that stopped the run before total_steps,
  after saving a checkpoint at `final_step`; None when the run finished. `data_ended`: the
  data ran out first (config.data.num_epochs passes), also saved at `final_step`.
  """

  losses: list[float]
  final_step: int
  model: nnx.Module
  workdir: str
  stopped_by: str | None = None
  data_ended: bool = False


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
  run_metadata: dict  # saved with the restored checkpoint (non-finite and seen counts); {} if new

  def model(self, params: dict) -> nnx.Module:
    """The model with parameters `params` (a state's "params")."""
    return nnx.merge(self.graphdef, params, self.rest)


def step_options(config: ml_collections.ConfigDict) -> dict:
  """make_train_step's keywords for `config`: micro-batches and the logit-scale ceiling."""
  return {"micro_batches": optim.micro_batches(config.optim),
          "max_logit_scale": losses.max_logit_scale(config.loss)}


def _value_and_grad(graphdef: nnx.GraphDef, rest: nnx.State, fixed: dict, batch,
                    micro_batches: int) -> Callable:
  """trainable params -> ((loss, aux), grads) of the model's loss on `batch`.

  One micro-batch: jax.value_and_grad of `model.loss`. More: the towers run in
  micro-batches and the loss sees the whole batch (optim.accumulated_value_and_grad over
  `model.features` and `model.loss_on_features`).
  """

  def model(trainable):
    return nnx.merge(graphdef, merge_params(trainable, fixed), rest)

  if micro_batches == 1:
    return jax.value_and_grad(lambda p: model(p).loss(batch), has_aux=True)
  accumulated = optim.accumulated_value_and_grad(
      lambda p, rows: model(p).features(rows),
      lambda p, features, whole: model(p).loss_on_features(features, whole), micro_batches)
  return lambda trainable: accumulated(trainable, batch)


def _clamp_logit_scale(params: dict, ceiling: float | None) -> dict:
  """`params` with a trainable "logit_scale" t' clamped to at most `ceiling` (None: as is)."""
  if ceiling is None or "logit_scale" not in params:
    return params
  return {**params, "logit_scale": jnp.minimum(params["logit_scale"], ceiling)}


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, accum_steps: int, frozen, *,
                    micro_batches: int = 1, max_logit_scale: float | None = None) -> Callable:
  """The pure train step (state, batch) -> (state, metrics); state is a dict pytree.

  state = {"params": pure dict of float32 params, "opt_state": optax state of the trainable
  params, "step": int32}. `frozen` (bools like params, optim.frozen_mask) marks parameters
  that never train: the step splits them off (optim.split_frozen), differentiates and
  updates only the others, and hands the frozen ones back unchanged, so no backward pass
  and no optimizer state is spent on them (LiT's locked image tower). The loss is the
  model's own (`model.loss(batch)`); with `micro_batches` = k > 1 the towers run in k
  micro-batches of the batch's rows and the loss and gradients are still the whole
  batch's (config.optim.grad_accum = "full_batch"). `accum_steps` is the number of steps
  per optimizer update (optim.calls_per_update), for the learning rate reported. After the
  update t' = logit_scale is clamped to at most `max_logit_scale` (CLIP's t <= 100;
  losses.max_logit_scale). A step with a non-finite loss or gradient leaves params and
  opt_state as they were and reports metrics["nonfinite"] = 1 (navit_clip.nonfinite).
  """

  def train_step(state, batch):
    trainable, fixed = split_frozen(state["params"], frozen)
    (loss, aux), grads = _value_and_grad(graphdef, rest, fixed, batch,
                                         micro_batches)(trainable)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new = _clamp_logit_scale(optax.apply_updates(trainable, updates), max_logit_scale)
    (new, opt_state), skipped = nonfinite.keep_if_finite(
        loss, grad_norm, (new, opt_state), (trainable, state["opt_state"]))
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, nonfinite=skipped,
                   lr=schedule(state["step"] // accum_steps))
    return {"params": merge_params(new, fixed), "opt_state": opt_state,
            "step": state["step"] + 1}, metrics

  return train_step


def _flat(tree: dict, prefix: str = "") -> dict:
  """{"a.b.c": value} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{dotted key: (saved value, value in `config`)} of the keys that both have and that
  differ; `saved` is a config.json. Keys only one side has (added or removed from the
  framework since) are left out, and so is the tokenizer path save_config rewrote."""
  old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  changes = {k: (old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]}
  if old.get("data.tokenizer.path") == WORKDIR_TOKENIZER:
    changes.pop("data.tokenizer.path", None)
  return changes


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Compares `config` with the workdir's config.json before a resume.

  Raises:
    UserError: naming each changed key of RESUME_FIXED_KEYS, its saved and its new value.
  Other changes (total_steps, log_every, the learning rate, ...) are logged.
  """
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    return
  with storage.open(path, "r") as f, as_user_errors(path):
    changes = config_changes(json.load(f), config)
  fixed = sorted(k for k in changes
                 if any(k == f or k.startswith(f"{f}.") for f in RESUME_FIXED_KEYS))

  def listed(keys):
    return ", ".join(f"config.{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in keys)

  if fixed:
    raise UserError(f"cannot resume {workdir} with {listed(fixed)}: these shape the model, "
                    "the optimizer state or the data stream its checkpoints hold; keep the "
                    f"values of {path} or train in a new workdir")
  if changes:
    log.info("resuming %s with changes to its saved config: %s", workdir,
             listed(sorted(changes)))


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh of config.mesh; batch rows split over its ("data", "fsdp") axes."""
  mesh = sharding.make_mesh(config.mesh)
  if config.data.batch_size % sharding.batch_shards(mesh):
    raise ValueError(f"config.data.batch_size = {config.data.batch_size} does not split over "
                     f"the {sharding.batch_shards(mesh)} data x fsdp devices of mesh "
                     f"{dict(mesh.shape)}")
  return mesh


def _initial_state(config, ckpt: Checkpointer, init_state: Callable, params: dict,
                   shardings, data_iter) -> tuple[dict, int, dict]:
  """(state, its step, run metadata): created sharded, then resumed from `ckpt` if it has
  a checkpoint.

  A fresh run starts from `params`, or from config.init's run when that is set; a resumed
  one restores the state, `data_iter`'s position and the run metadata saved with them from
  `ckpt`'s newest intact checkpoint (navit_clip.checkpoint falls back past damaged ones).
  """
  resuming = ckpt.latest_step() is not None
  if config.init.checkpoint and not resuming:  # start from another run's parameters
    params = init_from.load_params(config.init, params, shardings["params"])
  state = jax.jit(init_state, out_shardings=shardings)(params)
  if not resuming:
    return state, 0, {}
  restored = ckpt.restore(None, state, data_iter)
  log.info("resumed from %s at step %d", ckpt.directory, restored.step)
  return restored.state, int(restored.state["step"]), restored.run_metadata


def _compile(step_fn, state: dict, config: ml_collections.ConfigDict, mesh):
  """`step_fn` compiled ahead of time for `state` and the device fields of the batch spec."""
  batch = pipeline.batch_spec(config)
  log.info("compiling the train step for batches of %d rows x %d patch tokens (%s image "
           "tower%s) on %d %s device(s); this can take minutes, then training starts",
           batch.batch_size, batch.seq_len, config.model.image.variant,
           f", {config.model.text.variant} text tower" if config.task == "contrastive" else "",
           mesh.size, jax.devices()[0].platform)
  spec = device_fields({k: jax.ShapeDtypeStruct(shape, dtype)
                        for k, (shape, dtype) in batch.shapes().items()})
  with jax.set_mesh(mesh):
    return step_fn.lower(state, spec).compile()


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Builds everything the loop needs (see the module docstring).

  Checks config.train only; the whole config is checked by navit_clip.config.validate,
  which the commands (navit_clip.cli, navit_clip.demo) run before they train.
  """
  check_config(config.train)
  distributed.initialize(config.distributed)
  tc = config.train
  ckpt = Checkpointer(storage.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints,
                      keep_period=tc.keep_period or None, writer=True)
  if ckpt.latest_step() is not None:
    check_resumable(config, workdir)  # before anything is built or written
  data_iter = iter(pipeline.make_train_dataset(  # packed host NumPy batches
      config, **distributed.data_share(config.data)))
  mesh = _make_mesh(config)
  graphdef, params, rest = nnx.split(build_model(config, rngs=nnx.Rngs(config.seed)),
                                     nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  calls = optim.calls_per_update(config.optim)  # train steps per optimizer update
  updates_total = max(config.train.total_steps // calls, 1)
  tx = make_optimizer(config.optim, params, updates_total)
  frozen = frozen_mask(config.optim, params)  # never differentiated, never in the optimizer

  def init_state(params):
    return {"params": params, "opt_state": tx.init(split_frozen(params, frozen)[0]),
            "step": jnp.zeros((), jnp.int32)}

  shardings = sharding.state_shardings(jax.eval_shape(init_state, params), mesh,
                                       config.sharding)
  state, start_step, run_metadata = _initial_state(config, ckpt, init_state, params,
                                                   shardings, data_iter)
  if jax.process_index() == 0:
    save_config(config, workdir)  # only now: a failed restart leaves the saved one as it was
  schedule = make_schedule(config.optim, updates_total)
  step_fn = jax.jit(make_train_step(graphdef, rest, tx, schedule, calls, frozen,
                                    **step_options(config)),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  compiled = _compile(step_fn, state, config, mesh)
  return _Run(data_iter, mesh, ckpt, compiled, flops_lib.compiled_flops(compiled), state,
              start_step, graphdef, rest, run_metadata)


def _evaluate(model: nnx.Module, config: ml_collections.ConfigDict, step: int, workdir: str,
              logger: MetricsLogger) -> None:
  """Runs the evaluations of config.evals due at `step` and logs their scalars."""
  evals = run_evals(model, config, step, workdir)
  if evals:
    logger.log(step, scalar_metrics(evals), prefix="eval")


def _train_record(metrics: Mapping, throughput: Throughput,
                  monitor: nonfinite.NonfiniteMonitor, data_iter) -> dict[str, float]:
  """A log step's record: the step's scalar metrics, throughput, skip counters and the
  share of images shrunk to fit a row."""
  out = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
  out.update(throughput.report())  # after the device sync: the window's steps are done
  out["nonfinite_steps"] = monitor.skipped
  counters = data_counters(data_iter)
  out.update({f"data/{k}": v for k, v in counters.items()})
  out["shrunk_share"] = shrunk_share(counters)  # of the images so far, shrunk to fit a row
  return out


def _next_batch(data_iter: Iterator, throughput: Throughput) -> dict | None:
  """The next host batch, counted in the throughput window; None once the data has ended
  (after config.data.num_epochs passes)."""
  t0 = time.perf_counter()
  try:
    batch = next(data_iter)
  except StopIteration:
    return None
  throughput.add(batch, time.perf_counter() - t0)
  return batch


def _data_ended(ended_here: bool, config: ml_collections.ConfigDict) -> bool:
  """Whether the run's data has ended: here, or with finite data (config.data.num_epochs)
  on several processes, on any of them, so that all stop at the same step (a process whose
  share ended first cannot feed its rows of the next global batch)."""
  if config.data.num_epochs == 0 or jax.process_count() == 1:
    return ended_here
  return bool(np.any(multihost_utils.process_allgather(np.asarray(ended_here))))


def _log_early_end(result: TrainResult, config: ml_collections.ConfigDict,
                   directory: str) -> None:
  """Says why a run ended before config.train.total_steps, if it did."""
  if result.stopped_by:
    log.warning("stopped by %s after step %d; saved to %s", result.stopped_by,
                result.final_step, directory)
  elif result.data_ended:
    epochs = config.data.num_epochs
    log.warning("ran %d epoch%s of the training data (config.data.num_epochs): it ended at "
                "step %d of %d; saved to %s", epochs, "" if epochs == 1 else "s",
                result.final_step, config.train.total_steps, directory)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint if any."""
  run, tc, rows = _setup(config, workdir), config.train, config.data.batch_size
  state, step, data_ended = run.state, run.start_step, False
  logger = MetricsLogger(workdir, tc.total_steps, is_primary=jax.process_index() == 0,
                         tensorboard=tc.tensorboard, resume_step=step)
  monitor = nonfinite.NonfiniteMonitor(  # per-step losses, NaN / Inf; counts survive resumes
      tc.nonfinite, run.ckpt, tc.max_consecutive_nonfinite, counts=run.run_metadata)
  throughput = Throughput(rows, run.step_flops,  # images and tokens seen survive resumes
                          tc.peak_flops or flops_lib.measure_matmul_peak(),
                          seen=run.run_metadata)
  guard = PreemptionGuard().install()  # SIGTERM / SIGINT: save and stop after this step
  try:
    while step < tc.total_steps:
      batch = _next_batch(run.data_iter, throughput)
      if _data_ended(batch is None, config):
        data_ended = True
        break
      state, metrics = run.step_fn(state, sharding.global_batch(device_fields(batch),
                                                                run.mesh, rows))
      step += 1
      monitor.record(step, metrics)
      if step % tc.checkpoint_every == 0:
        monitor.check()  # a state from after a non-finite step is never saved in "stop" mode
        run.ckpt.save(step, state, run.data_iter,
                      run_metadata=monitor.counts() | throughput.seen())
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
    run.ckpt.save_and_wait(step, state, run.data_iter,
                           run_metadata=monitor.counts() | throughput.seen())
  finally:
    run.ckpt.close()
    run.data_iter.close()  # its Grain workers end now, not at exit
    logger.close()
    guard.uninstall()
  result = TrainResult(losses=monitor.losses, final_step=step,
                       model=run.model(state["params"]), workdir=workdir,
                       stopped_by=guard.signal_name, data_ended=data_ended)
  _log_early_end(result, config, run.ckpt.directory)
  return result
