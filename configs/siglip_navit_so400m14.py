"""SigLIP pretraining of a NaViT-So400m/14 image tower (the shape-optimised 400M ViT) with
a So400m-width text tower; sequences of 1024 patches at side ~ U(64, 768)."""

from navit_clip.configs import siglip_navit_b16


def get_config(arg: str = ""):
  c = siglip_navit_b16.get_config(arg or "2048")
  c.model.image.variant = "So400m/14"
  c.model.text.variant = "So400m"
  c.model.text.remat = "dots"
  c.data.seq_len = 1024
  c.data.max_images = 32
  c.data.resolution.max_side = 768
  c.optim.lr = 5e-4
  return c
