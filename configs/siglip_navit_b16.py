"""SigLIP pretraining of a NaViT-B/16 image tower with a B text tower on WebLI-style pairs.

After NaViT's contrastive recipe (appendix B.2): T5-style 32k SentencePiece, 24 text tokens
(here 64 for alt-texts), lr 3e-3 (here 1e-3 for AdamW), wd 1e-6. Images: side length
~ U(64, 256), so every image fits the 256-patch row (a 256 px square is 16 x 16 patches)
and none is shrunk to it, with resolution-dependent token dropping (NaViT section 3.3) from
10% of 16 patches to 70% of 256: about 62 tokens and 4.1 images a row, 1% padding on
500x375 images (bench/recipe_packing.py). Set data.source and data.tokenizer.path for your
data; `arg` picks the batch size in rows (default 4096 rows of 256 tokens, about 17k images
per batch).

    navit-clip train --config siglip_navit_b16 --workdir gs://bucket/run \
        --config.data.tokenizer.path=/path/c4_en.model
"""

from navit_clip.config import default_config
from navit_clip.configs import _packing


def get_config(arg: str = ""):
  c = default_config()
  c.task = "contrastive"
  c.model.image.variant = "B/16"
  c.model.image.posemb = "learned"
  c.model.image.posemb_resolution = 64
  c.model.image.dtype = "bfloat16"
  c.model.image.remat = "dots"
  c.model.image.scan_layers = True
  c.model.text.variant = "B"
  c.model.text.vocab_size = 32_000
  c.model.text.max_len = 64
  c.model.text.dtype = "bfloat16"
  c.model.text.scan_layers = True
  c.data.batch_size = int(arg) if arg else 4096
  c.data.seq_len = 256
  c.data.max_images = 16
  _packing.sides_within_the_row(c.data, max_side=256, min_tokens=16, max_tokens=256)
  c.data.num_workers = 16
  c.loss.name = "sigmoid"
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.b2 = 0.95
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 5_000
  c.optim.schedule = "cosine"
  c.train.total_steps = 250_000
  c.train.log_every = 100
  c.train.checkpoint_every = 2_000
  return c
