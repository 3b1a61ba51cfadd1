"""CLIP (softmax) pretraining of a NaViT-B/16 image tower: siglip_navit_b16 with the
softmax loss and CLIP's temperature init (t = 1/0.07, no bias)."""

from navit_clip.configs import siglip_navit_b16


def get_config(arg: str = ""):
  c = siglip_navit_b16.get_config(arg)
  c.loss.name = "softmax"
  c.optim.lr = 5e-4
  c.optim.weight_decay = 0.2
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  return c
