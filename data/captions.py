"""Captions from records: several per image, bytes of unknown encoding, empty ones.

A record's "caption" is a str, UTF-8 bytes, or a list of them (WebLI alt-texts, COCO's
five). `choose_caption` keeps the usable ones and picks one with the caller's generator,
so the choice is reproducible for a seed and differs between epochs when the generator is
keyed on the stream position.
"""

from __future__ import annotations

import numpy as np

REPAIR_POLICIES = ("replace", "skip")


class CaptionError(ValueError):
  """No usable caption; `reason` is "missing_caption", "empty_caption" or "caption_not_utf8"."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _clean(value, repair: str) -> tuple[str | None, bool]:
  """One caption -> (stripped text or None if unusable, whether it was repaired)."""
  repaired = False
  if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
    raw = bytes(value)
    try:
      value = raw.decode("utf-8")
    except UnicodeDecodeError:
      if repair == "skip":
        return None, False
      value, repaired = raw.decode("utf-8", errors="replace"), True
  elif isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from surrogateescape
      if repair == "skip":
        return None, False
      value, repaired = value.encode("utf-8", errors="replace").decode("utf-8"), True
  else:
    return None, False
  value = value.replace("\x00", "").strip()
  return (value or None), repaired


def choose_caption(value, rng: np.random.Generator, repair: str = "replace"
                   ) -> tuple[str, bool]:
  """Picks one usable caption from a record's "caption" field.

  Args:
    value: str, bytes, or a list / tuple / array of them; None if the record has none.
    rng: draws the choice among several usable captions (not used for a single one).
    repair: "replace" decodes invalid UTF-8 with U+FFFD; "skip" treats it as unusable.

  Returns:
    (caption, repaired): the chosen text, stripped, and whether it needed repair.

  Raises:
    CaptionError: "missing_caption" (None or no entries), "caption_not_utf8" (all
      entries invalid UTF-8 under "skip"), "empty_caption" (the rest).
  """
  items = _entries(value)
  if not items:
    raise CaptionError("missing_caption")
  cleaned = [_clean(v, repair) for v in items]
  usable = [(text, rep) for text, rep in cleaned if text is not None]
  if not usable:
    not_utf8 = repair == "skip" and any(isinstance(v, (bytes, bytearray)) and _not_utf8(v)
                                         for v in items)
    raise CaptionError("caption_not_utf8" if not_utf8 else "empty_caption")
  return usable[0] if len(usable) == 1 else usable[int(rng.integers(len(usable)))]


def usable_captions(value, repair: str = "replace") -> list[str]:
  """Every usable caption of a record's "caption" field, stripped, in order.

  Args:
    value: str, bytes, or a list / tuple / array of them; None if the record has none.
    repair: as in `choose_caption`.

  Returns:
    The texts `choose_caption` chooses from; [] when there is none.
  """
  return [text for text, _ in (_clean(v, repair) for v in _entries(value)) if text is not None]


def usable_entries(value, repair: str = "replace") -> list:
  """The entries of a record's "caption" field that give a usable caption, unchanged.

  Args:
    value: as in `usable_captions`.
    repair: as in `choose_caption`.

  Returns:
    The str / bytes entries, not stripped or repaired, in order (what a converter keeps,
    so that training applies these rules again and counts the repairs).
  """
  return [v for v in _entries(value) if _clean(v, repair)[0] is not None]


def _entries(value) -> list:
  """A "caption" field as a list of entries: [] for None, [value] for a single one."""
  if value is None:
    return []
  return list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]


def _not_utf8(raw: bytes) -> bool:
  try:
    bytes(raw).decode("utf-8")
    return False
  except UnicodeDecodeError:
    return True
