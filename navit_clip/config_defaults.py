"""The one typed place for configuration defaults: every key, its default, its comment.

`default_config()` builds the whole tree, one function per section; recipes in configs/
start from it (through navit_clip.config) and override what they change. ml_collections
keeps every field's type, so assigning a string to an int field raises. Restoring a run
(navit_clip.evaluate.restore) lays its saved config.json over these defaults. The checks
that types cannot make are in navit_clip.config.validate.
"""

from __future__ import annotations

import ml_collections

from navit_clip.data import pack
from navit_clip.sharding import DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
  """Every key the framework reads, with its default and therefore its type."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = _model_defaults()
  c.data = _data_defaults()
  c.optim = _optim_defaults()
  c.loss = _loss_defaults()
  # Devices (navit_clip.sharding): mesh axis sizes, -1 = the devices left over.
  c.mesh = "data:-1,fsdp:1,model:1"
  c.sharding = _sharding_defaults()
  c.distributed = _distributed_defaults()
  c.task = "contrastive"  # contrastive (two towers) | classification (image tower + head)
  c.train = _train_defaults()
  c.init = _init_defaults()
  # Evaluators, by name -> navit_clip.evaluate.evaluators.eval_config(...); none by default.
  c.evals = ml_collections.ConfigDict()
  # The policy of `navit-clip eval --zeroshot/--retrieval`, `embed` and `export` when
  # --resolution is not given (navit_clip.evaluate.inference_resolution); an imported
  # checkpoint's is its image processor's (square:S, naflex:N).
  c.inference_resolution = "budget:256"
  return c


def _model_defaults() -> ml_collections.ConfigDict:
  """config.model: the two towers and the classification head."""
  m = ml_collections.ConfigDict()
  m.image = _image_defaults()
  m.text = _text_defaults()
  m.num_classes = 0  # classification: K
  m.head_bias_init = 0.0  # classification head bias (e.g. -10 for JFT multi-label)
  return m


def _image_defaults() -> ml_collections.ConfigDict:
  """config.model.image: the NaViT image tower (navit_clip.image_tower)."""
  img = ml_collections.ConfigDict()
  img.variant = "S/16"  # size/patch, see navit_clip.variants
  img.channels = 3
  img.posemb = "learned"  # factorized phi_y + phi_x: learned | sincos | fourier; or one
  # S x S table resized to each grid (SigLIP 2 NaFlex's): learned_2d
  img.posemb_coords = "fractional"  # fractional (p / grid side) | absolute (patch index)
  img.posemb_resolution = 64  # learned tables: buckets over [0, 1) (fractional) or max side
  img.qk_norm = True
  img.use_bias = False  # bias removal as in ViT-22B
  img.pool = "map"  # map | mean
  img.dtype = "float32"  # compute dtype; params are always float32
  img.remat = "none"  # none | full | dots
  img.scan_layers = False
  img.attention = "xla"  # auto | xla | cudnn | pallas_gpu | splash | blocked (navit_clip.attention)
  return img


def _text_defaults() -> ml_collections.ConfigDict:
  """config.model.text: the text tower; its tokenizer is config.data.tokenizer
  (Tokenizer.check_config checks the pair)."""
  txt = ml_collections.ConfigDict()
  txt.variant = "S"  # size only, see navit_clip.variants
  txt.vocab_size = 32_000  # embedding rows: >= the tokenizer's vocabulary size
  txt.max_len = 64  # T tokens per caption, EOS included
  txt.eos_id = 1  # the tokenizer's EOS id (1 for T5, mT5, Gemma and trained tokenizers)
  txt.pool = "eos"  # one of TEXT_POOLS: eos | map | mean | last (SigLIP's last position)
  txt.causal = False  # causal instead of bidirectional self-attention
  txt.qk_norm = True
  txt.use_bias = False
  txt.dtype = "float32"  # compute dtype; params are always float32
  txt.remat = "none"  # none | full | dots
  txt.scan_layers = False
  return txt


def _data_defaults() -> ml_collections.ConfigDict:
  """config.data: batch shape, source and reading, decoding, per-example work, packing."""
  d = ml_collections.ConfigDict()
  d.batch_size = 8  # B rows per global batch
  d.seq_len = 256  # L patch tokens per row
  d.max_images = 8  # M images per row
  d.resolution = _resolution_defaults()
  d.token_drop = _token_drop_defaults()
  d.packer = "window_best_fit"  # one of navit_clip.data.pack_dataset.PACKERS
  d.pack_window = pack.DEFAULT_WINDOW  # images kept pending by window_best_fit
  d.pack_bins = pack.DEFAULT_BINS  # rows kept open by first_fit / best_fit
  d.tokenizer = _tokenizer_defaults()
  d.source = "demo"  # one of navit_clip.data.pipeline.SOURCES
  d.train_files = ""  # "a/shard-{00000..00099}.tar,b/*.tfrecord"; a folder for folder sources
  d.eval_files = ""  # the same for evaluation (random-access sources)
  d.mixture = ""  # source "mixture": "kind:files=weight;kind:files=weight"
  # folder source: image paths are relative to image_root or absolute, and lie inside it
  # ("" = the index file's folder; "/" allows any absolute path)
  d.image_root = ""
  d.csv_separator = ","  # captions.csv: one character; "\\t" = tab (open_clip's)
  d.csv_image_key = ""  # its image column ("" = file|image|filename|path|filepath)
  d.csv_caption_key = ""  # its caption column ("" = every caption*|text|title column)
  d.source_seed = 0  # the demo source's generator seed
  d.num_train_examples = 50_000  # demo source size
  d.num_eval_examples = 1_000
  d.label_field = "label"  # classification: record field holding the class
  d.num_epochs = 0  # passes over the training data; 0 = endless
  d.num_workers = 0  # Grain worker processes for per-example work (0 = in process)
  # Threads that read and preprocess records in this process when num_workers = 0 (0 = the
  # host's cores, at most 16): decoding releases the GIL, Python work does not.
  d.read_threads = 0
  # How workers share a streamed source: "files" (worker w of W reads files w::W of each
  # epoch's order: every record read once), "records" (every worker reads every record and
  # decodes its share: batches independent of the worker count, but W reads of each
  # shard), "auto" (files when every stream has at least one file a worker).
  d.stream_split = "auto"
  d.shard_by_process = True  # each JAX process reads its own share (records or files)
  d.cycle_length = 16  # streamed sources: files read at once, interleaved
  d.shuffle_window = 1024  # streamed sources: records shuffled within windows (1 = off)
  # larger tar members, TFRecord records and folder image files are skipped unread, counted
  d.max_member_bytes = 32 << 20
  d.caption_repair = "replace"  # invalid UTF-8 captions: "replace" (counted) or "skip"
  # stop when more than this share of the records is unusable, or of a stream's files cannot
  # be read to the end; at 1 only a source with no usable record at all stops
  d.max_bad_fraction = 0.5
  d.bad_check_min_records = 1000  # ... once at least this many records have been read
  d.decode = _decode_defaults()
  d.example_keys = _example_keys_defaults()
  return d


def _tokenizer_defaults() -> ml_collections.ConfigDict:
  """config.data.tokenizer: the caption tokenizer (navit_clip.data.pipeline.make_tokenizer)."""
  tok = ml_collections.ConfigDict()
  tok.path = ""  # SentencePiece .model file (contrastive mode)
  tok.lowercase = False  # lowercase captions before encoding
  tok.pad_id = -1  # the id written after EOS; -1 = the model's own pad id (SigLIP: EOS)
  return tok


def _resolution_defaults() -> ml_collections.ConfigDict:
  """config.data.resolution: the target size of each image (data/resolution_sampling.py)."""
  res = ml_collections.ConfigDict()
  res.kind = "uniform_side"  # one of navit_clip.data.resolution_sampling.KINDS
  res.min_side = 64  # pixels; uniform_side / truncnorm_side range
  res.max_side = 256
  res.truncnorm_mean = -0.5  # truncnorm_side: N_t(mean, std) over [-1, 1] mapped to range
  res.truncnorm_std = 1.0
  res.area = 224 * 224  # fixed_area: pixels
  res.patch_budget = 256  # patch_budget: at most this many patches
  res.square_side = 224  # square: every image squashed to this side (the ViT baseline)
  res.max_upscale = 2.0  # never enlarge an image by more than this factor
  return res


def _token_drop_defaults() -> ml_collections.ConfigDict:
  """config.data.token_drop: per-image patch dropping (data/token_drop.py)."""
  drop = ml_collections.ConfigDict()
  drop.kind = "none"  # one of navit_clip.data.token_drop.KINDS
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
  return drop


def _decode_defaults() -> ml_collections.ConfigDict:
  """config.data.decode: what decoding refuses (data/decode.py)."""
  dec = ml_collections.ConfigDict()
  dec.draft = True  # decode JPEGs at 1/2, 1/4, 1/8 scale when the target is that small
  # "auto": RGB / grayscale JPEGs by libjpeg-turbo through simplejpeg (PIL's pixels,
  # faster), everything else by PIL; "pil": everything by PIL
  dec.decoder = "auto"
  dec.max_pixels = 100_000_000  # larger images are decompression bombs (0 = no limit)
  dec.min_side = 8  # images with a shorter side are skipped (0 = none)
  dec.max_aspect = 20.0  # images with a longer long/short side ratio are skipped (0 = none)
  dec.mislabelled = "decode"  # content != declared format: "decode" (counted) or "skip"
  return dec


def _example_keys_defaults() -> ml_collections.ConfigDict:
  """config.data.example_keys: tf.train.Example features (TFRecord, ArrayRecord)."""
  keys = ml_collections.ConfigDict()
  keys.image = "image/encoded"  # encoded image bytes
  keys.caption = "caption"  # one caption or several (WebLI: "texts"); "" = none
  keys.example_id = "example_id"  # int64 id; "" = derived from the position
  keys.image_format = "image/format"  # declared format; "" = none
  return keys


def _optim_defaults() -> ml_collections.ConfigDict:
  """config.optim: the optimizer (navit_clip.optim); steps count optimizer updates."""
  o = ml_collections.ConfigDict()
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
  # "regex=mult;...": weight decay x mult, first match wins, checked before wd_regex (x1);
  # names neither matches are not decayed (e.g. "(.*/)?head/kernel=100", JFT's head)
  o.wd_mults = ""
  o.clip_norm = 1.0  # global gradient norm; 0 = no clipping
  o.lr_mults = ""  # "regex=mult;regex=mult", first match wins; 0 freezes (e.g. "image/.*=0")
  o.grad_accum_steps = 1  # micro-batches per optimizer update
  # how they combine, when grad_accum_steps = K > 1:
  #   full_batch       each step takes config.data.batch_size rows, embeds them in K
  #                    micro-batches and takes the loss over all of them (every row's
  #                    negatives), gradients exactly the whole batch's; a train step is
  #                    one update
  #   per_micro_batch  each step is one micro-batch of config.data.batch_size rows with
  #                    its own loss (negatives from it alone); every K-th step updates
  o.grad_accum = "full_batch"
  return o


def _loss_defaults() -> ml_collections.ConfigDict:
  """config.loss: the loss (navit_clip.losses)."""
  loss = ml_collections.ConfigDict()
  loss.name = "sigmoid"  # one of LOSSES: sigmoid | softmax | sigmoid_xent | softmax_xent
  loss.init_t = ml_collections.config_dict.placeholder(float)  # None: 10 / 1/0.07
  loss.init_b = ml_collections.config_dict.placeholder(float)  # None: -10 / none (softmax)
  loss.chunked = False  # contrastive: across devices, no global logits (chunked_loss)
  # contrastive: the train step clamps t to at most max_t after every update; None: 100
  # (softmax, as CLIP) / no clamp (sigmoid, as SigLIP); 0 = no clamp
  loss.max_t = ml_collections.config_dict.placeholder(float)
  return loss


def _sharding_defaults() -> ml_collections.ConfigDict:
  """config.sharding: how parameters split over the mesh (navit_clip.sharding)."""
  sh = ml_collections.ConfigDict()
  sh.rules = DEFAULT_RULES  # "regex=axes;..." tensor-parallel rules over "model"
  sh.fsdp_min_size = 2 ** 14  # leaves with fewer elements stay replicated over "fsdp"
  return sh


def _distributed_defaults() -> ml_collections.ConfigDict:
  """config.distributed: several processes (navit_clip.distributed), an explicit
  coordinator or a detected cluster."""
  dist = ml_collections.ConfigDict()
  dist.initialize = "auto"  # auto (detect Slurm / Cloud TPU / JAX_COORDINATOR_ADDRESS) | yes | no
  dist.coordinator = ""  # "host:port" of process 0; set with num_processes and process_id
  dist.num_processes = 0
  dist.process_id = -1
  dist.cpu_collectives = "gloo"  # collectives between processes on CPU devices
  return dist


def _train_defaults() -> ml_collections.ConfigDict:
  """config.train: the run (navit_clip.train)."""
  t = ml_collections.ConfigDict()
  t.total_steps = 1000  # train steps, each one packed batch (see config.optim.grad_accum)
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3  # keep the last K
  t.keep_period = 0  # and every N-th step forever (0 = none)
  t.peak_flops = 0.0  # device peak for MFU; 0 = measure a matmul at start
  t.tensorboard = True
  t.nonfinite = "stop"  # NaN / Inf loss or gradients: "stop" (raise) | "skip" (the step)
  t.max_consecutive_nonfinite = 10  # "skip": this many skipped in a row stop the run
  return t


def _init_defaults() -> ml_collections.ConfigDict:
  """config.init: start from another run's parameters (navit_clip.init_from); only when
  not resuming."""
  init = ml_collections.ConfigDict()
  init.checkpoint = ""  # a workdir, its checkpoints/ or one step's directory; "" = none
  init.step = -1  # -1 = the latest complete checkpoint
  init.params = "image"  # "src->dst;...": this model's dst/... from the checkpoint's src/...
  return init
