"""The runs of `navit-clip study`: tiny SigLIP towers on the built-in study shapes.

    get_config("navit")             native aspect, side ~ U(24, 56), packed rows
    get_config("vit")               the ViT baseline: squashed to 48 x 48, one image a row
    get_config("navit_absolute")    NaViT with factorized absolute position embeddings
    get_config("navit_learned_2d")  NaViT with one learned 2-D table resized per image
    get_config("drop_constant")     NaViT dropping half of each image's tokens
    get_config("drop_beta")         ... a Beta-distributed share, mean one half
    get_config("drop_resolution")   ... 10% of the smallest images' tokens to 70% of the largest

Every run processes about 1,000 real patch tokens a step (`navit-clip study` sets the steps
from a token budget), with patches of 8 px; NaViT's images have about 26 patches on
average, the ViT's 36. `navit-clip train --config study:vit --workdir DIR` trains one of
them on its own (it needs --config.data.tokenizer.path; the study trains one).
"""

from __future__ import annotations

from navit_clip.config import default_config

MIN_SIDE, MAX_SIDE = 24, 56  # NaViT's training sides, px: (3 to 7 patches)^2
VIT_SIDE = 48  # the baseline's square side, px: 6 x 6 patches
VARIANTS = ("navit", "vit", "navit_absolute", "navit_learned_2d", "drop_constant",
            "drop_beta", "drop_resolution")


def _base():
  """NaViT: the native-aspect, sampled-resolution, packed run that the others change."""
  c = default_config()
  c.task = "contrastive"
  c.model.image.variant = "w64-d3-m128-h4/8"
  c.model.image.posemb = "learned"
  c.model.image.posemb_coords = "fractional"
  c.model.image.posemb_resolution = 16
  c.model.text.variant = "w64-d2-m128-h4"
  c.model.text.vocab_size = 96  # a BPE tokenizer of 96 pieces holds every caption word whole
  c.model.text.max_len = 10  # the longest caption: 8 words and EOS
  c.data.source = "study_shapes"
  c.data.num_eval_examples = 600
  c.data.tokenizer.lowercase = True
  c.data.batch_size = 8
  c.data.seq_len = 128
  c.data.max_images = 16  # room for dropped images: ~13 tokens each at a 50% drop
  c.data.resolution.kind = "uniform_side"
  c.data.resolution.min_side = MIN_SIDE
  c.data.resolution.max_side = MAX_SIDE
  c.data.pack_window = 64
  c.loss.name = "sigmoid"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 1e-4
  c.train.total_steps = 400  # the study sets the steps from its token budget
  c.train.log_every = 50
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 10
  c.train.tensorboard = False
  c.train.peak_flops = 150e9  # this CPU's f32 matmul peak; skips measuring it every run
  return c


def get_config(arg: str = "navit"):
  """The run `arg`, one of VARIANTS (see the module docstring)."""
  variant = arg or "navit"
  if variant not in VARIANTS:
    raise ValueError(f"configs/study.py: variant {variant!r}; expected one of {list(VARIANTS)}")
  c = _base()
  if variant == "vit":
    c.data.resolution.kind = "square"
    c.data.resolution.square_side = VIT_SIDE
    c.data.seq_len = (VIT_SIDE // 8) ** 2  # one image fills a row: no padding
    c.data.max_images = 1
    c.data.batch_size = 28  # 28 x 36 = 1,008 tokens a step, as NaViT's 8 x 128 less padding
  elif variant == "navit_absolute":
    c.model.image.posemb_coords = "absolute"
  elif variant == "navit_learned_2d":
    c.model.image.posemb = "learned_2d"
    c.model.image.posemb_resolution = 8  # an 8 x 8 table, resized to each grid
  elif variant.startswith("drop_"):
    drop = c.data.token_drop
    drop.kind = variant.removeprefix("drop_")
    drop.rate = 0.5  # constant: the rate; beta: its mean, of at most max_rate
    drop.max_rate = 0.7 if drop.kind == "resolution" else 0.9
    drop.min_rate = 0.1  # resolution: from 10% at min_tokens to 70% at max_tokens
    drop.min_tokens, drop.max_tokens = 9, 49  # NaViT's smallest and largest images
  return c
