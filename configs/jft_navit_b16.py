"""JFT-style classification pretraining of a NaViT-B/16 (NaViT appendix B.1).

Multi-label sigmoid cross-entropy over 29,593 classes (records carry a list of class
indices in "labels"), images resized to r^2 pixels with r ~ U(64, 256) and the aspect ratio
kept, resolution-dependent token dropping from 10% of 16 patches to 70% of 256 (NaViT
section 3.3; about 4.1 images a row, bench/recipe_packing.py), Adafactor with an rsqrt
schedule at peak lr 8e-4. Weight decay 0.03 on the body's kernels and 100x that, 3.0, on
the head's, as the paper and big_vision's JFT recipes (wd_mults) do.
"""

from navit_clip.config import default_config
from navit_clip.configs import _packing


def get_config(arg: str = ""):
  c = default_config()
  c.task = "classification"
  c.model.image.variant = "B/16"
  c.model.image.dtype = "bfloat16"
  c.model.image.remat = "dots"
  c.model.image.scan_layers = True
  c.model.num_classes = 29_593
  c.model.head_bias_init = -10.0
  c.loss.name = "sigmoid_xent"
  c.data.batch_size = int(arg) if arg else 1024
  c.data.seq_len = 256
  c.data.max_images = 16
  _packing.sides_within_the_row(c.data, max_side=256, min_tokens=16, max_tokens=256)
  c.data.label_field = "labels"
  c.data.num_workers = 16
  c.optim.name = "adafactor"
  c.optim.lr = 8e-4
  c.optim.schedule = "rsqrt"
  c.optim.warmup_steps = 10_000
  c.optim.cooldown_steps = 50_000
  c.optim.weight_decay = 0.03
  c.optim.wd_mults = "head/kernel=100"  # then wd_regex: every other kernel x1
  c.train.total_steps = 500_000
  c.train.checkpoint_every = 5_000
  return c
