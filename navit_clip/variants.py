"""Named transformer sizes, as big_vision names them ("B/16" = size B, patch 16)."""

from __future__ import annotations

import dataclasses


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


def parse_variant(variant: str) -> tuple[Size, int | None]:
  """'B/16' -> (Size of B, 16); 'B' -> (Size of B, None). Clear error on unknown names."""
  name, _, patch = variant.partition("/")
  if name not in SIZES:
    raise ValueError(f"unknown model size {name!r} in variant {variant!r}; "
                     f"known sizes: {', '.join(SIZES)}")
  if patch and not patch.isdigit():
    raise ValueError(f"patch size in variant {variant!r} must be an integer")
  return SIZES[name], int(patch) if patch else None
