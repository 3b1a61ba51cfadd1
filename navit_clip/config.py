"""The one typed place for configuration defaults.

Recipe files in configs/ start from `default_config()` and override what they change;
ml_collections keeps every field's type (assigning a string to an int field raises), and the
command line overrides any field (`--config.model.image.variant=B/16`). `validate()` checks
the combinations that types cannot.
"""

from __future__ import annotations

import re

import ml_collections

from navit_clip import posemb
from navit_clip.attention import CHOICES as ATTENTION_CHOICES
from navit_clip.data import captions, pack, pack_dataset, resolution_sampling, token_drop
from navit_clip.losses import CONTRASTIVE_LOSSES, LOSSES
from navit_clip.nonfinite import MODES as NONFINITE_MODES
from navit_clip.optim import OPTIMIZERS, SCHEDULES, parse_lr_mults
from navit_clip.sharding import DEFAULT_RULES, parse_mesh, parse_rules
from navit_clip.variants import parse_variant

POSEMB_KINDS, POSEMB_COORDS = posemb.KINDS, posemb.COORDS
RESOLUTION_KINDS = resolution_sampling.KINDS
TOKEN_DROP_KINDS = token_drop.KINDS
PACKERS = pack.ALGORITHMS + pack_dataset.GRAIN_PACKERS
DTYPES = ("float32", "bfloat16")
DISTRIBUTED_INIT = ("auto", "yes", "no")
REMAT = ("none", "full", "dots")
TEXT_POOLS = ("eos", "map", "mean")
DATA_SOURCES = ("demo", "arrayrecord", "folder", "class_folders", "webdataset", "tfrecord",
                "mixture")
EVAL_KINDS = ("zeroshot", "retrieval", "resolutions")


def eval_config(kind: str, dataset: str, **overrides) -> ml_collections.ConfigDict:
  """One evaluator of `config.evals` (see navit_clip.evaluate.runner), with its defaults.

  Recipes add evaluators by name: `c.evals.imagenet = eval_config("zeroshot", "folder:DIR",
  classnames="imagenet", every_steps=5000)`.
  """
  e = ml_collections.ConfigDict()
  e.kind = kind  # one of EVAL_KINDS
  e.dataset = dataset  # see navit_clip.evaluate.datasets: demo:TASK | folder:DIR | coco:... | ...
  e.every_steps = 0  # run inside training after every N-th step; 0 = standalone only
  e.resolution = "budget:256"  # inference policy: budget:N | side:S | native
  e.budgets = "64,128,256,576,1024"  # resolutions: the patch budgets of the sweep
  e.classnames = ""  # zeroshot: shipped list ("imagenet") or file; "" = the dataset's
  e.templates = ""  # zeroshot: "clip" | "clip_short" | file; "" = the dataset's, else "clip"
  e.split = "test"  # karpathy / tfds split
  e.images_dir = ""  # coco / karpathy: image root ("" = the annotation file's directory)
  e.data_dir = ""  # tfds data directory
  e.max_examples = 0  # evaluate the first N records only; 0 = all
  e.batch_size = 0  # inference batch rows; 0 = config.data.batch_size
  e.seq_len = 0  # tokens per row; 0 = max(config.data.seq_len, what the policy needs)
  e.max_images = 0  # images per row; 0 = config.data.max_images
  e.num_workers = 0  # Grain decoding processes
  e.update(overrides)
  return e


def default_config() -> ml_collections.ConfigDict:
  """Every key the framework reads, with its default and therefore its type."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Image tower (NaViT).
  c.model = ml_collections.ConfigDict()
  img = c.model.image = ml_collections.ConfigDict()
  img.variant = "S/16"  # size/patch, see navit_clip.variants
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
  img.attention = "xla"  # auto | xla | cudnn | pallas_gpu | splash (navit_clip.attention)

  # Text tower; its tokenizer is data.tokenizer (Tokenizer.check_config checks the pair).
  txt = c.model.text = ml_collections.ConfigDict()
  txt.variant = "S"  # size only, see navit_clip.variants
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
  loss.chunked = False  # contrastive: across devices, no global logits (chunked_loss)

  # Devices (navit_clip.sharding): mesh axis sizes, -1 = the devices left over.
  c.mesh = "data:-1,fsdp:1,model:1"
  sh = c.sharding = ml_collections.ConfigDict()
  sh.rules = DEFAULT_RULES  # "regex=axes;..." tensor-parallel rules over "model"
  sh.fsdp_min_size = 2 ** 14  # leaves with fewer elements stay replicated over "fsdp"

  # Several processes (navit_clip.distributed): explicit coordinator or detected cluster.
  dist = c.distributed = ml_collections.ConfigDict()
  dist.initialize = "auto"  # auto (detect Slurm / Cloud TPU / JAX_COORDINATOR_ADDRESS) | yes | no
  dist.coordinator = ""  # "host:port" of process 0; set with num_processes and process_id
  dist.num_processes = 0
  dist.process_id = -1
  dist.cpu_collectives = "gloo"  # collectives between processes on CPU devices

  # Task and run.
  c.task = "contrastive"  # contrastive (two towers) | classification (image tower + head)
  c.model.num_classes = 0  # classification: K
  c.model.head_bias_init = 0.0  # classification head bias (e.g. -10 for JFT multi-label)
  d.source = "demo"  # one of DATA_SOURCES
  d.train_files = ""  # "a/shard-{00000..00099}.tar,b/*.tfrecord"; a folder for folder sources
  d.eval_files = ""  # the same for evaluation (random-access sources)
  d.mixture = ""  # source "mixture": "kind:files=weight;kind:files=weight"
  d.source_seed = 0  # the demo source's generator seed
  d.num_train_examples = 50_000  # demo source size
  d.num_eval_examples = 1_000
  d.label_field = "label"  # classification: record field holding the class
  d.num_epochs = 0  # passes over the training data; 0 = endless
  d.num_workers = 0  # Grain worker processes for per-example work (0 = in process)
  d.shard_by_process = True  # each JAX process reads its own share (records or files)
  d.cycle_length = 16  # streamed sources: files read at once, interleaved
  d.shuffle_window = 1024  # streamed sources: records shuffled within windows (1 = off)
  d.max_member_bytes = 32 << 20  # webdataset: larger tar members are refused and counted
  d.caption_repair = "replace"  # invalid UTF-8 captions: "replace" (counted) or "skip"
  d.max_bad_fraction = 0.5  # stop when more than this share of records is unusable
  d.bad_check_min_records = 1000  # ... once at least this many records have been read
  dec = d.decode = ml_collections.ConfigDict()
  dec.draft = True  # decode JPEGs at 1/2, 1/4, 1/8 scale when the target is that small
  dec.max_pixels = 100_000_000  # larger images are decompression bombs (0 = no limit)
  dec.min_side = 8  # images with a shorter side are skipped (0 = none)
  dec.max_aspect = 20.0  # images with a longer long/short side ratio are skipped (0 = none)
  dec.mislabelled = "decode"  # content != declared format: "decode" (counted) or "skip"
  keys = d.example_keys = ml_collections.ConfigDict()  # tf.train.Example features
  keys.image = "image/encoded"  # encoded image bytes
  keys.caption = "caption"  # one caption or several (WebLI: "texts"); "" = none
  keys.example_id = "example_id"  # int64 id; "" = derived from the position
  keys.image_format = "image/format"  # declared format; "" = none

  t = c.train = ml_collections.ConfigDict()
  t.total_steps = 1000  # micro-batches (each one packed batch)
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3  # keep the last K
  t.keep_period = 0  # and every N-th step forever (0 = none)
  t.peak_flops = 0.0  # device peak for MFU; 0 = measure a matmul at start
  t.tensorboard = True
  t.nonfinite = "stop"  # NaN / Inf loss or gradients: "stop" (raise) | "skip" (the step)

  # Start from another run's parameters (navit_clip.init_from); only when not resuming.
  init = c.init = ml_collections.ConfigDict()
  init.checkpoint = ""  # a workdir, its checkpoints/ or one step's directory; "" = none
  init.step = -1  # -1 = the latest complete checkpoint
  init.params = "image"  # "src->dst;...": this model's dst/... from the checkpoint's src/...

  # Evaluators, by name -> eval_config(...); none by default.
  c.evals = ml_collections.ConfigDict()
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
  choice("model.image.attention", img.attention, ATTENTION_CHOICES)
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
  choice("train.nonfinite", c.train.nonfinite, NONFINITE_MODES)
  if c.init.checkpoint:
    from navit_clip.init_from import parse_mapping  # imports Orbax: loaded on use
    parse_mapping(c.init.params)
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
  choice("data.source", d.source, DATA_SOURCES)
  if d.source not in ("demo", "mixture") and not d.train_files:
    raise ValueError(f"config.data.source = {d.source!r} needs config.data.train_files")
  if d.source == "mixture" and not d.mixture:
    raise ValueError("config.data.source = 'mixture' needs config.data.mixture = "
                     "'kind:files=weight;...'")
  choice("data.caption_repair", d.caption_repair, captions.REPAIR_POLICIES)
  choice("data.decode.mislabelled", d.decode.mislabelled, ("decode", "skip"))
  for key in ("num_epochs", "num_workers", "bad_check_min_records"):
    if d[key] < 0:
      raise ValueError(f"config.data.{key} = {d[key]} must be >= 0")
  for key in ("cycle_length", "shuffle_window", "max_member_bytes"):
    if d[key] < 1:
      raise ValueError(f"config.data.{key} = {d[key]} must be >= 1")
  if not 0.0 < d.max_bad_fraction <= 1.0:
    raise ValueError(f"config.data.max_bad_fraction = {d.max_bad_fraction} must be in (0, 1]")
  for key in ("max_pixels", "min_side", "max_aspect"):
    if d.decode[key] < 0:
      raise ValueError(f"config.data.decode.{key} = {d.decode[key]} must be >= 0 (0 = off)")
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
  for name, e in c.evals.items():
    _validate_eval(name, e, choice)
  choice("loss.name", c.loss.name, LOSSES)
  if c.loss.chunked and c.loss.name not in CONTRASTIVE_LOSSES:
    raise ValueError(f"config.loss.chunked applies to the contrastive losses "
                     f"{list(CONTRASTIVE_LOSSES)}, not {c.loss.name!r}")
  try:
    parse_mesh(c.mesh)
  except ValueError as e:
    raise ValueError(f"config.mesh = {c.mesh!r}: {e}") from e
  try:
    parse_rules(c.sharding.rules)
  except ValueError as e:
    raise ValueError(f"config.sharding.rules: {e}") from e
  if c.sharding.fsdp_min_size < 0:
    raise ValueError(f"config.sharding.fsdp_min_size = {c.sharding.fsdp_min_size} must be "
                     ">= 0")
  dist = c.distributed
  choice("distributed.initialize", dist.initialize, DISTRIBUTED_INIT)
  if dist.coordinator and not 0 <= dist.process_id < dist.num_processes:
    raise ValueError(f"config.distributed.coordinator = {dist.coordinator!r} needs "
                     f"num_processes >= 1 and 0 <= process_id < num_processes, got "
                     f"{dist.num_processes}, {dist.process_id}")
  if c.loss.init_t is not None and not c.loss.init_t > 0:
    raise ValueError(f"config.loss.init_t = {c.loss.init_t} must be > 0")
  if c.loss.init_b is not None and c.loss.name != "sigmoid":
    raise ValueError(f"config.loss.init_b = {c.loss.init_b} is set but loss "
                     f"{c.loss.name!r} has no bias")


def _validate_eval(name: str, e: ml_collections.ConfigDict, choice) -> None:
  """Checks one entry of config.evals."""
  from navit_clip.evaluate.inference_resolution import ResolutionPolicy  # evaluation code, loaded on use

  key = f"evals.{name}"
  choice(f"{key}.kind", e.kind, EVAL_KINDS)
  if not e.dataset:
    raise ValueError(f"config.{key}.dataset is empty")
  for field in ("every_steps", "max_examples", "batch_size", "seq_len", "max_images",
                "num_workers"):
    if e[field] < 0:
      raise ValueError(f"config.{key}.{field} = {e[field]} must be >= 0")
  try:
    ResolutionPolicy.parse(e.resolution)
    for budget in e.budgets.split(","):
      ResolutionPolicy("budget", int(budget))
  except ValueError as err:
    raise ValueError(f"config.{key}: {err}") from err
  if e.kind == "retrieval" and (e.classnames or e.templates):
    raise ValueError(f"config.{key}: classnames / templates apply to zero-shot, not retrieval")
