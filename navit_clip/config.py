"""The one typed place for configuration defaults.

Recipe files in configs/ start from `default_config()` and override what they change;
ml_collections keeps every field's type (assigning a string to an int field raises), and the
command line overrides any field (`--config.model.image.variant=B/16`). `validate()` checks
the combinations that types cannot.
"""

from __future__ import annotations

import re

import ml_collections

from navit_clip.attention import BACKENDS
from navit_clip.losses import LOSSES
from navit_clip.optim import OPTIMIZERS, SCHEDULES, parse_lr_mults
from navit_clip.sizes import parse_variant

POSEMB_KINDS = ("learned", "sincos", "fourier")
POSEMB_COORDS = ("fractional", "absolute")
RESOLUTION_KINDS = ("uniform_side", "truncnorm_side", "fixed_area", "patch_budget")
TOKEN_DROP_KINDS = ("none", "constant", "beta", "resolution")
PACKERS = ("first_fit", "best_fit", "window_best_fit", "grain_first_fit", "grain_best_fit")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
TEXT_POOLS = ("eos", "map", "mean")


def default_config() -> ml_collections.ConfigDict:
  """Every key the framework reads, with its default and therefore its type."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Image tower (NaViT).
  c.model = ml_collections.ConfigDict()
  img = c.model.image = ml_collections.ConfigDict()
  img.variant = "S/16"  # size/patch, see navit_clip.sizes
  img.channels = 3
  img.posemb = "learned"  # factorized phi_y + phi_x: learned | sincos | fourier
  img.posemb_coords = "fractional"  # fractional (p / grid side) | absolute (patch index)
  img.posemb_resolution = 64  # learned tables: buckets over [0, 1) (fractional) or max side
  img.qk_norm = True
  img.use_bias = False  # bias removal as in ViT-22B
  img.pool = "map"  # map | mean
  img.dtype = "float32"  # compute dtype; params are always float32
  img.remat = "none"  # none | full | dots
  img.scan_layers = False
  img.attention = "xla"  # one of navit_clip.attention.BACKENDS

  # Text tower; its tokenizer is data.tokenizer (Tokenizer.check_config checks the pair).
  txt = c.model.text = ml_collections.ConfigDict()
  txt.variant = "S"  # size only, see navit_clip.sizes
  txt.vocab_size = 32_000  # embedding rows: >= the tokenizer's vocabulary size
  txt.max_len = 64  # T tokens per caption, EOS included
  txt.eos_id = 1  # the tokenizer's EOS id (1 for T5, mT5, Gemma and trained tokenizers)
  txt.pool = "eos"  # one of TEXT_POOLS: eos | map | mean
  txt.causal = False  # causal instead of bidirectional self-attention
  txt.qk_norm = True
  txt.use_bias = False
  txt.dtype = "float32"  # compute dtype; params are always float32
  txt.remat = "none"  # none | full | dots
  txt.scan_layers = False

  # Data: resolution sampling, token dropping, packing.
  d = c.data = ml_collections.ConfigDict()
  d.batch_size = 8  # B rows per global batch
  d.seq_len = 256  # L patch tokens per row
  d.max_images = 8  # M images per row
  res = d.resolution = ml_collections.ConfigDict()
  res.kind = "uniform_side"  # one of RESOLUTION_KINDS
  res.min_side = 64  # pixels; uniform_side / truncnorm_side range
  res.max_side = 256
  res.truncnorm_mean = -0.5  # truncnorm_side: N_t(mean, std) over [-1, 1] mapped to range
  res.truncnorm_std = 1.0
  res.area = 224 * 224  # fixed_area: pixels
  res.patch_budget = 256  # patch_budget: at most this many patches
  res.max_upscale = 2.0  # never enlarge an image by more than this factor
  drop = d.token_drop = ml_collections.ConfigDict()
  drop.kind = "none"  # one of TOKEN_DROP_KINDS
  drop.rate = 0.5  # constant rate; mean rate for beta
  drop.max_rate = 0.9  # beta: d = u * max_rate; resolution: rate at the longest sequence
  drop.min_rate = 0.1  # resolution: rate at the shortest sequence
  drop.min_tokens = 16  # resolution: the shortest sequence (patches) of the stream
  drop.max_tokens = 256  # resolution: the longest sequence (patches) of the stream
  drop.resolution_std = 0.02  # resolution: std of N_trunc(mu, std), cut at 2 std
  drop.schedule = False  # sigmoid schedule of the rate over images seen (constant, beta)
  drop.schedule_start = 0.2  # rate at image 0; start > end gives a decreasing schedule
  drop.schedule_end = 0.8  # rate from schedule_images on
  drop.schedule_images = 1_000_000  # images over which the schedule moves
  d.packer = "window_best_fit"  # one of PACKERS
  d.pack_window = 256  # images kept pending by window_best_fit
  d.pack_bins = 64  # rows kept open by first_fit / best_fit
  tok = d.tokenizer = ml_collections.ConfigDict()
  tok.path = ""  # SentencePiece .model file (contrastive mode)
  tok.lowercase = False  # lowercase captions before encoding

  # Optimizer (navit_clip.optim); steps count optimizer updates.
  o = c.optim = ml_collections.ConfigDict()
  o.name = "adamw"  # one of OPTIMIZERS
  o.lr = 1e-3  # peak learning rate
  o.warmup_steps = 100  # linear warmup from 0
  o.schedule = "cosine"  # one of SCHEDULES, after warmup
  o.end_lr_factor = 0.0  # cosine / linear: final lr = lr * end_lr_factor
  o.rsqrt_timescale = 10_000  # rsqrt: lr / sqrt(1 + steps_after_warmup / timescale)
  o.cooldown_steps = 0  # rsqrt: linear cooldown to 0 over the last steps
  o.b1 = 0.9  # adamw; adafactor momentum (0 = none)
  o.b2 = 0.999  # adamw only (adafactor's second moment decays as step^-0.8)
  o.eps = 1e-8  # adamw only
  o.weight_decay = 1e-4  # decoupled, multiplied by the lr: p -= lr * wd * p
  o.wd_regex = "(.*/)?kernel"  # full match on "/"-joined parameter names
  o.clip_norm = 1.0  # global gradient norm; 0 = no clipping
  o.lr_mults = ""  # "regex=mult;regex=mult", first match wins; 0 freezes (e.g. "image/.*=0")
  o.grad_accum_steps = 1  # micro-batches per optimizer update

  # Loss (navit_clip.losses).
  loss = c.loss = ml_collections.ConfigDict()
  loss.name = "sigmoid"  # one of LOSSES: sigmoid | softmax | sigmoid_xent | softmax_xent
  loss.init_t = ml_collections.config_dict.placeholder(float)  # None: 10 / 1/0.07
  loss.init_b = ml_collections.config_dict.placeholder(float)  # None: -10 / none (softmax)

  # Task and run.
  c.task = "contrastive"  # contrastive (two towers) | classification (image tower + head)
  c.model.num_classes = 0  # classification: K
  c.model.head_bias_init = 0.0  # classification head bias (e.g. -10 for JFT multi-label)
  d.source = "demo"  # one of navit_clip.data.pipeline.SOURCES
  d.source_seed = 0  # the demo source's generator seed
  d.num_train_examples = 50_000  # demo source size
  d.num_eval_examples = 1_000
  d.label_field = "label"  # classification: record field holding the class
  d.num_workers = 0  # Grain worker processes for per-example work (0 = in process)

  t = c.train = ml_collections.ConfigDict()
  t.total_steps = 1000  # micro-batches (each one packed batch)
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3  # keep the last K
  t.keep_period = 0  # and every N-th step forever (0 = none)
  t.peak_flops = 0.0  # device peak for MFU; 0 = measure a matmul at start
  t.tensorboard = True
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key for combinations that types alone cannot catch."""

  def choice(key: str, value, allowed):
    if value not in allowed:
      raise ValueError(f"config.{key} = {value!r}; expected one of {list(allowed)}")

  img, d = c.model.image, c.data
  _, patch = parse_variant(img.variant)
  if patch is None:
    raise ValueError(f"config.model.image.variant = {img.variant!r} needs a patch size, "
                     "e.g. 'B/16'")
  choice("model.image.posemb", img.posemb, POSEMB_KINDS)
  choice("model.image.posemb_coords", img.posemb_coords, POSEMB_COORDS)
  choice("model.image.dtype", img.dtype, DTYPES)
  choice("model.image.remat", img.remat, REMAT)
  choice("model.image.attention", img.attention, BACKENDS)
  choice("model.image.pool", img.pool, ("map", "mean"))
  txt = c.model.text
  _, text_patch = parse_variant(txt.variant)
  if text_patch is not None:
    raise ValueError(f"config.model.text.variant = {txt.variant!r} names a patch size; give a "
                     "size only, e.g. 'B'")
  choice("model.text.pool", txt.pool, TEXT_POOLS)
  choice("model.text.dtype", txt.dtype, DTYPES)
  choice("model.text.remat", txt.remat, REMAT)
  if txt.max_len < 1:
    raise ValueError(f"config.model.text.max_len = {txt.max_len} must be >= 1")
  if not 0 <= txt.eos_id < txt.vocab_size:
    raise ValueError(f"config.model.text.eos_id = {txt.eos_id} must be in [0, vocab_size="
                     f"{txt.vocab_size})")
  choice("data.resolution.kind", d.resolution.kind, RESOLUTION_KINDS)
  choice("data.token_drop.kind", d.token_drop.kind, TOKEN_DROP_KINDS)
  choice("data.packer", d.packer, PACKERS)
  choice("task", c.task, ("contrastive", "classification"))
  if c.task == "classification" and c.model.num_classes < 1:
    raise ValueError(f"config.model.num_classes = {c.model.num_classes}: classification "
                     "needs >= 1 class")
  if c.train.log_every < 1 or c.train.checkpoint_every < 1:
    raise ValueError("config.train.log_every and checkpoint_every must be >= 1")
  if not 1 <= d.max_images <= d.seq_len:
    raise ValueError(f"config.data.max_images = {d.max_images} must be in [1, seq_len="
                     f"{d.seq_len}]")
  if not 0 < d.resolution.min_side <= d.resolution.max_side:
    raise ValueError("config.data.resolution needs 0 < min_side <= max_side, got "
                     f"{d.resolution.min_side}, {d.resolution.max_side}")
  for key in ("rate", "max_rate", "min_rate", "schedule_start", "schedule_end"):
    if not 0.0 <= d.token_drop[key] < 1.0:
      raise ValueError(f"config.data.token_drop.{key} = {d.token_drop[key]} must be in [0, 1)")
  if d.token_drop.kind == "resolution" and d.token_drop.schedule:
    raise ValueError("config.data.token_drop.schedule applies to kind 'constant' or 'beta', "
                     "not 'resolution'")
  if not 1 <= d.token_drop.min_tokens < d.token_drop.max_tokens:
    raise ValueError("config.data.token_drop needs 1 <= min_tokens < max_tokens, got "
                     f"{d.token_drop.min_tokens}, {d.token_drop.max_tokens}")
  if d.pack_window < 1 or d.pack_bins < 1:
    raise ValueError(f"config.data.pack_window = {d.pack_window} and pack_bins = "
                     f"{d.pack_bins} must be >= 1")

  o = c.optim
  choice("optim.name", o.name, OPTIMIZERS)
  choice("optim.schedule", o.schedule, SCHEDULES)
  for key in ("lr", "eps", "rsqrt_timescale", "grad_accum_steps"):
    if not o[key] > 0:
      raise ValueError(f"config.optim.{key} = {o[key]} must be > 0")
  for key in ("warmup_steps", "cooldown_steps", "weight_decay", "clip_norm"):
    if o[key] < 0:
      raise ValueError(f"config.optim.{key} = {o[key]} must be >= 0")
  for key in ("b1", "b2"):
    if not 0.0 <= o[key] < 1.0:
      raise ValueError(f"config.optim.{key} = {o[key]} must be in [0, 1)")
  if not 0.0 <= o.end_lr_factor <= 1.0:
    raise ValueError(f"config.optim.end_lr_factor = {o.end_lr_factor} must be in [0, 1]")
  try:
    re.compile(o.wd_regex)
  except re.error as e:
    raise ValueError(f"config.optim.wd_regex = {o.wd_regex!r} is not a regex: {e}") from e
  try:
    parse_lr_mults(o.lr_mults)
  except ValueError as e:
    raise ValueError(f"config.optim.lr_mults = {o.lr_mults!r}: {e}") from e
  choice("loss.name", c.loss.name, LOSSES)
  if c.loss.init_t is not None and not c.loss.init_t > 0:
    raise ValueError(f"config.loss.init_t = {c.loss.init_t} must be > 0")
  if c.loss.init_b is not None and c.loss.name != "sigmoid":
    raise ValueError(f"config.loss.init_b = {c.loss.init_b} is set but loss "
                     f"{c.loss.name!r} has no bias")
