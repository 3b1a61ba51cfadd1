"""LiT: a B text tower trained against a locked NaViT-B/16 image tower (arXiv 2111.07991).

The image tower comes from a classification run (e.g. configs/jft_navit_b16.py) and stays
frozen (lr multiplier 0: no update, no optimizer state); only the text tower and the logit
scale and bias learn, with the SigLIP loss. `arg` is that run's workdir (or a checkpoint
directory); --config.init.checkpoint and --config.init.step override it.

    navit-clip train --config lit_navit_b16:gs://bucket/jft_run --workdir gs://bucket/lit \
        --config.data.tokenizer.path=/path/c4_en.model
"""

from navit_clip.configs import siglip_navit_b16


def get_config(arg: str = ""):
  c = siglip_navit_b16.get_config()
  c.init.checkpoint = arg
  c.init.params = "image"  # the classification run's image tower; its head is not read
  c.optim.lr_mults = "image/.*=0"
  return c
