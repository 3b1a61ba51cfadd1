"""The one typed place for configuration defaults.

Recipe files in configs/ start from `default_config()` and override what they change;
ml_collections keeps every field's type (assigning a string to an int field raises), and the
command line overrides any field (`--config.model.image.variant=B/16`). `validate()` checks
the combinations that types cannot.
"""

from __future__ import annotations

import ml_collections

from navit_clip.attention import BACKENDS
from navit_clip.sizes import parse_variant

POSEMB_KINDS = ("learned", "sincos", "fourier")
POSEMB_COORDS = ("fractional", "absolute")
RESOLUTION_KINDS = ("uniform_side", "truncnorm_side", "fixed_area", "patch_budget")
TOKEN_DROP_KINDS = ("none", "constant", "beta", "resolution")
PACKERS = ("first_fit", "best_fit", "window_best_fit")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")


def default_config() -> ml_collections.ConfigDict:
  """Every key the framework reads, with its default and therefore its type."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Image tower (NaViT).
  c.model = ml_collections.ConfigDict()
  img = c.model.image = ml_collections.ConfigDict()
  img.variant = "S/16"  # size/patch, see navit_clip.sizes
  img.channels = 3
  img.posemb = "learned"  # factorized phi_y + phi_x: learned | sincos | fourier
  img.posemb_coords = "fractional"  # fractional (p / grid side) | absolute (patch index)
  img.posemb_resolution = 64  # learned tables: buckets over [0, 1) (fractional) or max side
  img.qk_norm = True
  img.use_bias = False  # bias removal as in ViT-22B
  img.pool = "map"  # map | mean
  img.dtype = "float32"  # compute dtype; params are always float32
  img.remat = "none"  # none | full | dots
  img.scan_layers = False
  img.attention = "xla"  # one of navit_clip.attention.BACKENDS

  # Data: resolution sampling, token dropping, packing.
  d = c.data = ml_collections.ConfigDict()
  d.batch_size = 8  # B rows per global batch
  d.seq_len = 256  # L patch tokens per row
  d.max_images = 8  # M images per row
  res = d.resolution = ml_collections.ConfigDict()
  res.kind = "uniform_side"  # one of RESOLUTION_KINDS
  res.min_side = 64  # pixels; uniform_side / truncnorm_side range
  res.max_side = 256
  res.truncnorm_mean = -0.5  # truncnorm_side: N_t(mean, std) over [-1, 1] mapped to range
  res.truncnorm_std = 1.0
  res.area = 224 * 224  # fixed_area: pixels
  res.patch_budget = 256  # patch_budget: at most this many patches
  res.max_upscale = 2.0  # never enlarge an image by more than this factor
  drop = d.token_drop = ml_collections.ConfigDict()
  drop.kind = "none"  # one of TOKEN_DROP_KINDS
  drop.rate = 0.5  # constant rate; mean rate for beta
  drop.max_rate = 0.9  # beta: d = u * max_rate; resolution: rate at the longest sequence
  drop.min_rate = 0.1  # resolution: rate at the shortest sequence
  drop.schedule = False  # sigmoid schedule of the rate over images seen
  drop.schedule_min = 0.2
  drop.schedule_max = 0.8
  drop.schedule_images = 1_000_000  # images over which the schedule rises
  d.packer = "window_best_fit"  # one of PACKERS
  d.pack_window = 256  # images kept pending by window_best_fit
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key for combinations that types alone cannot catch."""

  def choice(key: str, value, allowed):
    if value not in allowed:
      raise ValueError(f"config.{key} = {value!r}; expected one of {list(allowed)}")

  img, d = c.model.image, c.data
  _, patch = parse_variant(img.variant)
  if patch is None:
    raise ValueError(f"config.model.image.variant = {img.variant!r} needs a patch size, "
                     "e.g. 'B/16'")
  choice("model.image.posemb", img.posemb, POSEMB_KINDS)
  choice("model.image.posemb_coords", img.posemb_coords, POSEMB_COORDS)
  choice("model.image.dtype", img.dtype, DTYPES)
  choice("model.image.remat", img.remat, REMAT)
  choice("model.image.attention", img.attention, BACKENDS)
  choice("model.image.pool", img.pool, ("map", "mean"))
  choice("data.resolution.kind", d.resolution.kind, RESOLUTION_KINDS)
  choice("data.token_drop.kind", d.token_drop.kind, TOKEN_DROP_KINDS)
  choice("data.packer", d.packer, PACKERS)
  if not 1 <= d.max_images <= d.seq_len:
    raise ValueError(f"config.data.max_images = {d.max_images} must be in [1, seq_len="
                     f"{d.seq_len}]")
  if not 0 < d.resolution.min_side <= d.resolution.max_side:
    raise ValueError("config.data.resolution needs 0 < min_side <= max_side, got "
                     f"{d.resolution.min_side}, {d.resolution.max_side}")
  for key in ("rate", "max_rate", "min_rate", "schedule_min", "schedule_max"):
    if not 0.0 <= d.token_drop[key] < 1.0:
      raise ValueError(f"config.data.token_drop.{key} = {d.token_drop[key]} must be in [0, 1)")
