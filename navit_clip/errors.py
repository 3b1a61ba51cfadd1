"""User errors: bad input, as opposed to a defect of the program.

Library code raises `UserError` (a ValueError, so callers that catch ValueError still do)
when what it was given is wrong: a config key or value, a file that is missing or is not
what it should be, data with nothing usable in it. `MissingInputError` is the same for a
missing file or directory, and is also a FileNotFoundError. The command line prints a user
error as one line and exits 2; any other exception is a defect and keeps its traceback.

`as_user_errors(...)` turns the ValueError / KeyError / FileNotFoundError of a step that
only checks input (loading a config, validating it) into user errors at the boundary
where that input enters, so a ValueError from deep inside a computation stays a defect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError)


class UserError(ValueError):
  """The input (config, file, data, command-line value) is wrong; the message says how."""


class MissingInputError(UserError, FileNotFoundError):
  """A file or directory the input names does not exist."""


def message(error: BaseException) -> str:
  """The text of an exception: a KeyError without its quotes, an OSError with its path."""
  if isinstance(error, KeyError) and len(error.args) == 1:
    return str(error.args[0])
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    return f"{error.filename}: {error.strerror}"
  return str(error)


@contextlib.contextmanager
def as_user_errors(what: str = "",
                   types: tuple[type[BaseException], ...] = INPUT_ERRORS) -> Iterator[None]:
  """Re-raises the `types` raised inside as UserError, prefixed with `what: ` if given."""
  try:
    yield
  except UserError:
    raise
  except types as e:
    text = message(e)
    raise UserError(f"{what}: {text}" if what else text) from e
