"""`navit-clip study`: the NaViT claims in miniature, measured on built-in data.

Tiny SigLIP towers (configs/study.py) train through `navit_clip.train.train` on the study
shapes (navit_clip.data.sources.study_shapes: a shape's own proportions, which a square
resize distorts, tell its class), and are scored zero-shot on held-out images at
checkpoints along each run:

1. NaViT (native aspect, side ~ U(24, 56), packed rows) against the ViT baseline (squashed
   to 48 x 48, one image a row): accuracy at equal compute, and the compute each needs to
   reach the same accuracy, read off the accuracy-against-tokens curves.
2. Position embeddings (factorized fractional and absolute, one learned 2-D table) at fixed
   sides inside and outside the training range.
3. Token dropping (constant, Beta, resolution-dependent) against none, at equal compute
   and at equal images.
4. One NaViT model at many patch budgets: accuracy against tokens per image and images/s.

Equal compute means the same number of real (non-padding) patch tokens. Each run's steps
are set from the tokens its first batches hold, and the trainer counts what the run
processed (`tokens_seen` in metrics.jsonl); the tables print those counts.
`run_study` writes study.md, results.json and the plots into its workdir
(navit_clip.study_report).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from navit_clip import study_report
from navit_clip.config import validate
from navit_clip.config_loading import apply_overrides, load_config
from navit_clip.configs import study as study_configs
from navit_clip.data import pipeline
from navit_clip.data.batch import device_fields
from navit_clip.data.sources import study_shapes
from navit_clip.evaluate import resolution_sweep, zeroshot
from navit_clip.evaluate.embedder import Embedder
from navit_clip.evaluate.inference_batches import inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec
from navit_clip.evaluate.restore import checkpoint_steps, restore_model
from navit_clip.text.tokenizer import Tokenizer, train_tokenizer
from navit_clip.train import train

log = logging.getLogger(__name__)

TOKENIZER_CORPUS = 20_000  # captions the study's tokenizer is trained on
ESTIMATE_BATCHES = 8  # first batches of a run that set its tokens (or images) per step
DROP_VARIANTS = ("drop_constant", "drop_beta", "drop_resolution")
POSEMB_VARIANTS = ("navit", "navit_absolute", "navit_learned_2d")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How much the study runs.

  Attributes:
    tokens: real patch tokens that every equal-compute run trains on.
    seeds: seeds of study 1 (NaViT and ViT); posemb_seeds and drop_seeds those of studies
      2 and 3, whose fractional / no-drop run is study 1's NaViT run of the same seed.
    points: evaluations along each run, at equal step intervals, the last at its end.
    eval_examples: held-out images of each evaluation.
    sides: the fixed sides (px, area side x side, aspect kept) of study 2.
    budgets: the patch budgets of study 4.
  """

  tokens: int
  seeds: tuple[int, ...]
  posemb_seeds: tuple[int, ...]
  drop_seeds: tuple[int, ...]
  points: int
  eval_examples: int
  sides: tuple[int, ...]
  budgets: tuple[int, ...]

  def __post_init__(self):
    if not self.seeds or not set(self.posemb_seeds + self.drop_seeds) <= set(self.seeds):
      raise ValueError(f"study plan: posemb_seeds {self.posemb_seeds} and drop_seeds "
                       f"{self.drop_seeds} must be among the seeds {self.seeds} (their "
                       "baseline is study 1's NaViT run of the same seed), which is not empty")
    if min(self.tokens, self.points, self.eval_examples) < 1:
      raise ValueError(f"study plan: tokens ({self.tokens}), points ({self.points}) and "
                       f"eval_examples ({self.eval_examples}) must be >= 1")


FULL = Plan(tokens=400_000, seeds=(0, 1), posemb_seeds=(0, 1), drop_seeds=(0, 1),
            points=5, eval_examples=600, sides=(16, 24, 32, 40, 48, 56, 72, 96, 128),
            budgets=(4, 9, 16, 25, 36, 64, 100, 144))
QUICK = Plan(tokens=24_000, seeds=(0,), posemb_seeds=(0,), drop_seeds=(0,), points=2,
             eval_examples=96, sides=(16, 40, 96), budgets=(9, 36, 100))


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a configs/study.py variant, a seed, and its budget of real patch
  tokens (or of images, when `by_images`)."""

  variant: str
  seed: int
  budget: float
  by_images: bool = False

  @property
  def name(self) -> str:
    return f"{self.variant}{'_equal_images' if self.by_images else ''}_s{self.seed}"


@dataclasses.dataclass
class RunResult:
  """What one run trained on and how it scored.

  `curve` has one entry per checkpoint: step, tokens_seen, images_seen and the zero-shot
  accuracies at the run's main resolution (`main_policy`); `at_sides` maps "side:S" to the
  final accuracies there (study 2's runs only).
  """

  name: str
  variant: str
  seed: int
  by_images: bool
  steps: int
  tokens_seen: float
  images_seen: float
  train_s: float
  curve: list[dict]
  at_sides: dict[str, dict] = dataclasses.field(default_factory=dict)

  @property
  def final(self) -> dict:
    return self.curve[-1]


def use_compilation_cache(path: str) -> None:
  """Keeps this process's compiled programs in JAX's persistent cache at `path`.

  The study's runs share programs (the seeds of a variant, and NaViT with and without
  token dropping, compile to the same train step), so each compiles once; on a small CPU
  a compile costs more than the training of a quick run.
  """
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main_policy(config: ml_collections.ConfigDict) -> str:
  """The resolution a run is scored at: its own square for the ViT, else a budget of the
  ViT's patches per image (aspect kept)."""
  res = config.data.resolution
  if res.kind == "square":
    return f"square:{res.square_side}"
  return f"budget:{(study_configs.VIT_SIDE // 8) ** 2}"


def step_counts(config: ml_collections.ConfigDict) -> tuple[float, float]:
  """(real patch tokens, images) per step of `config`: the means of its first batches,
  the very batches its run starts with."""
  it = iter(pipeline.make_train_dataset(config))
  try:
    batches = [next(it) for _ in range(ESTIMATE_BATCHES)]
  finally:
    it.close()
  return (float(np.mean([(b["segment_ids"] > 0).sum() for b in batches])),
          float(np.mean([b["image_mask"].sum() for b in batches])))


def run_config(run: Run, plan: Plan, tokenizer_path: str,
               overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """configs/study.py's `run.variant` with the overrides, seeded, its steps set so that it
  trains on `run.budget` tokens (or images), a checkpoint at each of `plan.points`."""
  config = load_config(f"study:{run.variant}")
  apply_overrides(config, list(overrides))
  config.seed = run.seed
  config.data.tokenizer.path = tokenizer_path
  config.data.num_eval_examples = plan.eval_examples
  tokens, images = step_counts(config)
  per_step = images if run.by_images else tokens
  interval = max(1, round(run.budget / (plan.points * per_step)))
  t = config.train
  t.total_steps = interval * plan.points
  t.checkpoint_every = t.log_every = interval
  t.keep_checkpoints = plan.points + 1
  config.optim.warmup_steps = max(1, t.total_steps // 10)
  validate(config)
  return config


class ZeroShot:
  """Zero-shot scores of study models on the held-out shapes.

  The packed eval batches are built once per batch shape and resolution, and the embedding
  functions compiled once per model shape, then reused across runs and checkpoints.
  """

  def __init__(self, tokenizer: Tokenizer, num_examples: int, source_seed: int):
    self.source = study_shapes.StudyShapesSource("eval", num_examples, seed=source_seed)
    self.task = study_shapes.zero_shot_tasks()["shape"]
    self.tokenizer = tokenizer
    self.prompt_tokens = tokenizer.encode(
        [p for c in range(len(self.task.classnames)) for p in self.task.prompts(c)])
    self._batches: dict[tuple, list[dict]] = {}
    self._functions: dict[str, tuple] = {}

  def batches(self, config: ml_collections.ConfigDict, policy: str) -> list[dict]:
    """Host batches of the eval images under `policy`, in `config`'s batch shape, with
    int32 "labels" (the shape)."""
    parsed = ResolutionPolicy.parse(policy)
    spec = inference_spec(config, parsed, num_classes=len(self.task.classnames))
    key = (spec, policy)
    if key not in self._batches:
      sampler = parsed.sampler(spec.patch_size, spec.seq_len,
                               config.data.resolution.max_upscale)
      self._batches[key] = list(inference_batches(self.source, spec, sampler,
                                                  label_field=self.task.label_field))
    return self._batches[key]

  def _compiled(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef) -> tuple:
    key = config.model.to_json(sort_keys=True)
    if key not in self._functions:
      self._functions[key] = (
          jax.jit(lambda p, r, b: nnx.merge(graphdef, p, r).embed_images(b)[0]),
          jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r).embed_texts(t)))
    return self._functions[key]

  def score(self, model: nnx.Module, config: ml_collections.ConfigDict,
            policy: str) -> dict[str, float]:
    """top1 (6 shapes), proportion (3) and kind (2) accuracies of `model` under `policy`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images_fn, texts_fn = self._compiled(config, graphdef)
    texts = np.asarray(texts_fn(params, rest, self.prompt_tokens))
    classes = texts.reshape(len(self.task.classnames), -1, texts.shape[-1]).mean(axis=1)
    classes /= np.maximum(np.linalg.norm(classes, axis=-1, keepdims=True), 1e-6)
    embeddings, labels = [], []
    for batch in self.batches(config, policy):
      emb = np.asarray(images_fn(params, rest, device_fields(batch, drop=("labels",))))
      embeddings.append(emb[batch["image_mask"]])
      labels.append(batch["labels"][batch["image_mask"]])
    predicted = np.argmax(np.concatenate(embeddings) @ classes.T, axis=1)
    return study_shapes.shape_accuracies(predicted, np.concatenate(labels))


def _metrics_by_step(run_dir: str) -> dict[int, dict]:
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r for r in rows if r.get("split") == "train"}


def _curve(run_dir: str, scorer: ZeroShot, config: ml_collections.ConfigDict) -> list[dict]:
  """The run's scores at each checkpoint, with the tokens and images it had seen."""
  rows, policy, curve = _metrics_by_step(run_dir), main_policy(config), []
  for step in checkpoint_steps(run_dir):
    scores = scorer.score(restore_model(run_dir, step).model, config, policy)
    curve.append(dict(scores, step=step, tokens_seen=rows[step]["tokens_seen"],
                      images_seen=rows[step]["images_seen"]))
  return curve


def train_and_score(run: Run, plan: Plan, workdir: str, scorer: ZeroShot,
                    overrides: Sequence[str] = ()) -> RunResult:
  """Trains `run` afresh in workdir/runs/<name> and scores its checkpoints; at the end, at
  plan.sides too for the runs of study 2."""
  config = run_config(run, plan, os.path.join(workdir, "tokenizer.model"), overrides)
  run_dir = os.path.join(workdir, "runs", run.name)
  shutil.rmtree(run_dir, ignore_errors=True)
  t0 = time.perf_counter()
  result = train(config, run_dir)
  train_s = time.perf_counter() - t0
  curve = _curve(run_dir, scorer, config)
  out = RunResult(name=run.name, variant=run.variant, seed=run.seed, by_images=run.by_images,
                  steps=result.final_step, tokens_seen=curve[-1]["tokens_seen"],
                  images_seen=curve[-1]["images_seen"], train_s=train_s, curve=curve)
  if run.variant in POSEMB_VARIANTS and run.seed in plan.posemb_seeds and not run.by_images:
    out.at_sides = {f"side:{s}": scorer.score(result.model, config, f"side:{s}")
                    for s in plan.sides}
  log.info("study run %s: %d steps, %.0f tokens, %.0f images, %.0fs, top-1 %.1f%%",
           run.name, out.steps, out.tokens_seen, out.images_seen, train_s,
           100 * out.final["top1"])
  return out


def equal_compute_runs(plan: Plan) -> list[Run]:
  """The runs at plan.tokens: studies 1, 2 and 3 (equal compute)."""
  runs = [Run(v, s, plan.tokens) for s in plan.seeds for v in ("navit", "vit")]
  runs += [Run(v, s, plan.tokens) for s in plan.posemb_seeds for v in POSEMB_VARIANTS[1:]]
  runs += [Run(v, s, plan.tokens) for s in plan.drop_seeds for v in DROP_VARIANTS]
  return runs


def equal_images_runs(plan: Plan, results: dict[str, RunResult]) -> list[Run]:
  """Study 3 at equal images: each drop kind on as many images as NaViT's run (no drop)
  of the same seed saw."""
  return [Run(v, s, results[Run("navit", s, plan.tokens).name].images_seen, by_images=True)
          for s in plan.drop_seeds for v in DROP_VARIANTS]


def resolution_sweep_rows(model: nnx.Module, config: ml_collections.ConfigDict,
                          scorer: ZeroShot, budgets: Sequence[int]) -> list[dict]:
  """Study 4: top-1, mean tokens per image and images/s of one model at each budget."""
  embedder = Embedder(model)
  task = scorer.task
  classifier = zeroshot.class_embeddings(embedder, scorer.tokenizer, task.classnames,
                                         task.templates)
  return [resolution_sweep.measure(embedder, scorer.batches(config, f"budget:{b}"),
                                   classifier, b) for b in budgets]


def _tokenizer(workdir: str, config: ml_collections.ConfigDict) -> Tokenizer:
  """The study's tokenizer, trained on study captions into workdir/tokenizer.model (BPE:
  at the study's vocabulary size its pieces are whole words)."""
  path = os.path.join(workdir, "tokenizer.model")
  train_tokenizer(study_shapes.caption_corpus(TOKENIZER_CORPUS, config.data.source_seed),
                  config.model.text.vocab_size, path, lowercase=config.data.tokenizer.lowercase,
                  model_type="bpe")
  config.data.tokenizer.path = path
  return pipeline.make_tokenizer(config)


def run_study(workdir: str, plan: Plan = FULL, overrides: Sequence[str] = ()) -> dict:
  """Runs the four studies of `plan` in `workdir`; writes study.md, results.json and the
  plots there (navit_clip.study_report) and returns the results."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  base = load_config("study:navit")
  apply_overrides(base, list(overrides))
  scorer = ZeroShot(_tokenizer(workdir, base), plan.eval_examples, base.data.source_seed)
  results: dict[str, RunResult] = {}
  for run in equal_compute_runs(plan):
    results[run.name] = train_and_score(run, plan, workdir, scorer, overrides)
  for run in equal_images_runs(plan, results):
    results[run.name] = train_and_score(run, plan, workdir, scorer, overrides)
  sweep_run = os.path.join(workdir, "runs", Run("navit", plan.seeds[0], plan.tokens).name)
  restored = restore_model(sweep_run)
  sweep = resolution_sweep_rows(restored.model, restored.config, scorer, plan.budgets)
  report = study_report.write(workdir, plan, results, sweep, time.perf_counter() - t0)
  print(report["summary"])
  return report
