"""Weighted mixtures of sources, written "kind:files=weight;kind:files=weight".

Example: "webdataset:/data/laion/{00000..00999}.tar=0.7;arrayrecord:/data/cc12m/*.ar=0.3".
"demo:=1" names the synthetic source (it has no files).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Component:
  kind: str
  files: str
  weight: float


def parse_mixture(spec: str, kinds: tuple[str, ...]) -> list[Component]:
  """Parses a mixture spec; raises ValueError naming the bad part."""
  out = []
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    body, sep, weight = part.rpartition("=")
    kind, colon, files = body.partition(":")
    if not sep or not colon:
      raise ValueError(f"mixture component {part!r}: expected kind:files=weight")
    if kind not in kinds:
      raise ValueError(f"mixture component {part!r}: kind {kind!r}; expected one of "
                       f"{list(kinds)}")
    try:
      w = float(weight)
    except ValueError:
      raise ValueError(f"mixture component {part!r}: weight {weight!r} is not a number") from None
    if not w > 0:
      raise ValueError(f"mixture component {part!r}: weight must be > 0")
    out.append(Component(kind, files.strip(), w))
  if not out:
    raise ValueError(f"mixture {spec!r} names no components")
  return out
