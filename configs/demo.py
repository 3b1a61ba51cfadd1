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
  # Mean pooling: at this size the MAP head (the recipes' default) learns more slowly; see
  # "The demo" in README.md.
  c.model.image.pool = "mean"
  c.model.text.variant = "w64-d2-m256-h4"  # nano's width, 2 layers: the captions are simple
  c.model.text.vocab_size = 200  # a BPE piece per caption word (navit_clip.demo)
  c.model.text.max_len = 16  # the longest caption is 13 pieces
  c.data.tokenizer.lowercase = True
  c.data.batch_size = 16
  c.data.seq_len = 128
  c.data.max_images = 12
  c.data.resolution.kind = "uniform_side"
  c.data.resolution.min_side = 32  # 4 to 6 patches a side: about 5 images a row
  c.data.resolution.max_side = 48
  c.data.pack_window = 64
  # One worker process draws the shapes: in this process their Python work would hold the
  # GIL against the training loop (1000 steps: 226 s instead of 272 s on 2 cores).
  c.data.num_workers = 1
  c.loss.name = "sigmoid"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 1e-4
  c.train.total_steps = 1000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  # Zero-shot on held-out images, by shape, colour and both, at 32 patches an image: inside
  # training every 200 steps on the first 300 images (the curves of the demo's plot), and
  # after training on all of them (navit_clip.demo).
  for task in ("shape", "color", "label"):
    c.evals[task] = eval_config("zeroshot", f"demo:{task}", resolution="budget:32",
                                every_steps=200, max_examples=300)
  return c
