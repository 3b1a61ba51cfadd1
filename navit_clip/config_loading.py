"""Loading a recipe config and applying command-line overrides.

A recipe is either a name under configs/ ("demo", "siglip_navit_b16") or a path to a Python
file; an optional ":arg" suffix is passed to its `get_config(arg)`. Overrides look like
`--config.model.image.variant=B/16` and are parsed to the type of the field they replace.
Bad input raises `navit_clip.errors.UserError` (a ValueError) naming the config or key.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os

import ml_collections

from navit_clip.errors import MissingInputError, UserError, as_user_errors

# What a recipe's get_config raises for a bad key or value (ml_collections: TypeError for a
# value of the wrong type, AttributeError / KeyError for a key that does not exist).
RECIPE_ERRORS = (ValueError, KeyError, TypeError, AttributeError)


def _load_module(name_or_path: str):
  if name_or_path.endswith(".py") or os.sep in name_or_path:
    if not os.path.isfile(name_or_path):
      raise MissingInputError(f"config file {name_or_path!r} does not exist")
    spec = importlib.util.spec_from_file_location("navit_clip_user_config", name_or_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  try:
    return importlib.import_module(f"navit_clip.configs.{name_or_path}")
  except ModuleNotFoundError as e:
    if e.name != f"navit_clip.configs.{name_or_path}":
      raise
    import navit_clip.configs as pkg
    known = sorted(f[:-3] for f in os.listdir(os.path.dirname(pkg.__file__))
                   if f.endswith(".py") and not f.startswith("_"))
    raise UserError(f"unknown config {name_or_path!r}; known: {', '.join(known)} "
                    "(or give a path to a .py file)") from None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'demo', 'configs/x.py' or 'configs/x.py:arg' -> the recipe's ConfigDict.

  Raises:
    UserError: the recipe does not exist, defines no get_config, or its get_config fails
      on a bad key or value (ValueError, KeyError, TypeError, AttributeError).
  """
  name, _, arg = spec.partition(":")
  module = _load_module(name)
  if not hasattr(module, "get_config"):
    raise UserError(f"config {name!r} defines no get_config(arg)")
  with as_user_errors(f"config {spec!r}", RECIPE_ERRORS):
    return module.get_config(arg) if arg else module.get_config()


def _a(declared: type) -> str:
  """"a float", "an int": the type name with its article."""
  name = declared.__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _parse_value(key: str, text: str, declared: type):
  """`text` as a value of the field's declared type (a placeholder's type when it is None)."""
  if declared is bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise UserError(f"--config.{key}={text!r}: expected true or false")
  if declared is str or declared is type(None):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{key}={text!r}: expected {_a(declared)}") from None
  if declared is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if declared is tuple and isinstance(value, list):
    value = tuple(value)
  if not isinstance(value, declared) or (isinstance(value, bool) and declared is not bool):
    raise UserError(f"--config.{key}={text!r}: expected {_a(declared)}, "
                    f"got {type(value).__name__}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies ["model.image.variant=B/16", ...] in place.

  Each value is parsed to the type of the field it replaces; a placeholder field (None,
  declared with `ml_collections.config_dict.placeholder(T)`) parses as T.

  Raises:
    UserError: an item without "=", an unknown key (named), or a value of the wrong type.
  """
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise UserError(f"--config.{item}: expected --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise UserError(f"--config.{key}: unknown key {'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise UserError(f"--config.{key}: unknown key {key!r}")
    value = _parse_value(key, text, node.get_type(leaf))
    with as_user_errors(f"--config.{key}={text!r}", (TypeError, ValueError)):
      node[leaf] = value
