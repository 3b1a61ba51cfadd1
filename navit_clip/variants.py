"""Transformer sizes: named as big_vision names them ("B/16" = size B, patch 16), or explicit.

An explicit size spells out every dimension, "w<width>-d<depth>-m<mlp_dim>-h<heads>", e.g.
"w768-d12-m3072-h12/16" (= "B/16"): for checkpoints whose sizes have no name.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Size:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int


SIZES: dict[str, Size] = {
    "mu": Size(32, 1, 128, 2),  # unit tests
    "nano": Size(64, 4, 256, 4),  # the CPU demo
    "Ti": Size(192, 12, 768, 3),
    "S": Size(384, 12, 1536, 6),
    "M": Size(512, 12, 2048, 8),
    "B": Size(768, 12, 3072, 12),
    "L": Size(1024, 24, 4096, 16),
    "So400m": Size(1152, 27, 4304, 16),
    "H": Size(1280, 32, 5120, 16),
    "g": Size(1408, 40, 6144, 16),
    "G": Size(1664, 48, 8192, 16),
    "e": Size(1792, 56, 15360, 16),
}


_EXPLICIT = re.compile(r"w(\d+)-d(\d+)-m(\d+)-h(\d+)")


def size_name(size: Size) -> str:
  """The name of `size` in SIZES, or its explicit spelling "w<width>-d<depth>-m<mlp>-h<heads>"."""
  for name, known in SIZES.items():
    if known == size:
      return name
  return f"w{size.width}-d{size.depth}-m{size.mlp_dim}-h{size.num_heads}"


def parse_variant(variant: str) -> tuple[Size, int | None]:
  """'B/16' -> (Size of B, 16); 'B' -> (Size of B, None); 'w32-d2-m64-h2/8' -> explicit.

  Clear error on unknown names and on explicit sizes with a zero dimension.
  """
  name, _, patch = variant.partition("/")
  explicit = _EXPLICIT.fullmatch(name)
  if explicit:
    size = Size(*(int(v) for v in explicit.groups()))
    if min(size.width, size.depth, size.mlp_dim, size.num_heads) < 1:
      raise ValueError(f"explicit model size {name!r} in variant {variant!r} needs every "
                       "dimension >= 1")
  elif name in SIZES:
    size = SIZES[name]
  else:
    raise ValueError(f"unknown model size {name!r} in variant {variant!r}; known sizes: "
                     f"{', '.join(SIZES)}, or explicit 'w<width>-d<depth>-m<mlp>-h<heads>'")
  if patch and not patch.isdigit():
    raise ValueError(f"patch size in variant {variant!r} must be an integer")
  return size, int(patch) if patch else None
