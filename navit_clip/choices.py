"""One wording for the errors of configuration checks: the key, its value, what it must be.

Every module that reads a config section checks it in its own `check_config(section)` and
phrases each error through these helpers, so that all of them read alike:
  config.model.image.posemb = 'x'; expected one of ['learned', 'sincos', 'fourier']
  config.optim.lr = 0.0 must be > 0
`key` is the full dotted key ("config.model.image.posemb"); a constructor that checks the
same choice for direct use names its argument instead ("position embedding kind").
Pure Python: every layer may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator


def check_choice(key: str, value, choices: Collection) -> None:
  """Raises ValueError "KEY = VALUE; expected one of [...]" unless `value` is in `choices`."""
  if value not in choices:
    raise ValueError(f"{key} = {value!r}; expected one of {list(choices)}")


def check_range(key: str, value, low=None, high=None, *, low_open: bool = False,
                high_open: bool = False) -> None:
  """Raises ValueError "KEY = VALUE must be >= LOW" (or "in [LOW, HIGH)", ...) when outside.

  `low` / `high` are inclusive bounds unless `low_open` / `high_open`; None is unbounded.
  """
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if not (too_low or too_high):
    return
  if high is None:
    bound = f"{'>' if low_open else '>='} {low}"
  elif low is None:
    bound = f"{'<' if high_open else '<='} {high}"
  else:
    bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  raise ValueError(f"{key} = {value!r} must be {bound}")


@contextlib.contextmanager
def naming(key: str, value) -> Iterator[None]:
  """Re-raises a ValueError from parsing `value` inside as "KEY = VALUE: <its message>"."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"{key} = {value!r}: {e}") from e
