"""The CPU demo: a tiny SigLIP NaViT on the built-in synthetic shapes, minutes on 2 cores.

    navit-clip demo                      # trains this, then zero-shot evaluates
    navit-clip train --config demo --workdir /tmp/demo --config.train.total_steps=100
"""

from navit_clip.config import default_config, eval_config


def get_config(arg: str = ""):
  del arg
  c = default_config()
  c.task = "contrastive"
  c.model.image.variant = "nano/8"
  c.model.image.posemb = "learned"
  c.model.image.posemb_resolution = 16
  c.model.text.variant = "nano"
  c.model.text.vocab_size = 64  # the demo captions use a few dozen words
  c.model.text.max_len = 16
  c.data.tokenizer.lowercase = True
  c.data.batch_size = 16
  c.data.seq_len = 128
  c.data.max_images = 12
  c.data.resolution.kind = "uniform_side"
  c.data.resolution.min_side = 24
  c.data.resolution.max_side = 72
  c.data.pack_window = 64
  c.loss.name = "sigmoid"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 1e-4
  c.train.total_steps = 1000
  c.train.log_every = 50
  c.train.checkpoint_every = 300
  # Zero-shot on held-out images, by shape, colour and both, at 32 patches an image; the
  # colour task also runs inside training every 500 steps.
  for task in ("shape", "color", "label"):
    c.evals[task] = eval_config("zeroshot", f"demo:{task}", resolution="budget:32")
  c.evals.color.every_steps = 500
  return c
