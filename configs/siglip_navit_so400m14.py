"""SigLIP pretraining of a NaViT-So400m/14 image tower (the shape-optimised 400M ViT) with
a So400m-width text tower; sequences of 1024 patches at side ~ U(64, 448) (a 448 px square
is 32 x 32 patches: the row), resolution-dependent token dropping from 10% of 20 patches to
70% of 1024: about 4.7 images a row, under 1% shrunk to fit (bench/recipe_packing.py)."""

from navit_clip.configs import _packing, siglip_navit_b16


def get_config(arg: str = ""):
  c = siglip_navit_b16.get_config(arg or "2048")
  c.model.image.variant = "So400m/14"
  c.model.text.variant = "So400m"
  c.model.text.remat = "dots"
  c.data.seq_len = 1024
  c.data.max_images = 32
  _packing.sides_within_the_row(c.data, max_side=448, min_tokens=20, max_tokens=1024)
  c.optim.lr = 5e-4
  return c
