"""Loading a recipe config and applying command-line overrides.

A recipe is either a name under configs/ ("demo", "siglip_navit_b16") or a path to a Python
file; an optional ":arg" suffix is passed to its `get_config(arg)`. Overrides look like
`--config.model.image.variant=B/16` and are parsed to the type of the field they replace.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os

import ml_collections


def _load_module(name_or_path: str):
  if name_or_path.endswith(".py") or os.sep in name_or_path:
    if not os.path.isfile(name_or_path):
      raise FileNotFoundError(f"config file {name_or_path!r} does not exist")
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
    raise ValueError(f"unknown config {name_or_path!r}; known: {', '.join(known)} "
                     "(or give a path to a .py file)") from None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'demo', 'configs/x.py' or 'configs/x.py:arg' -> the recipe's ConfigDict."""
  name, _, arg = spec.partition(":")
  module = _load_module(name)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config {name!r} defines no get_config(arg)")
  return module.get_config(arg) if arg else module.get_config()


def _parse_value(key: str, text: str, current):
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"--config.{key}={text!r}: expected true or false")
  if isinstance(current, str) or current is None:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"--config.{key}={text!r}: expected a {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if not isinstance(value, type(current)):
    raise ValueError(f"--config.{key}={text!r}: expected a {type(current).__name__}, "
                     f"got {type(value).__name__}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies ["model.image.variant=B/16", ...] in place; unknown keys raise, naming the key."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--config.{item}: expected --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node:
        raise ValueError(f"--config.{key}: unknown key {'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"--config.{key}: unknown key {key!r}")
    node[leaf] = _parse_value(key, text, node[leaf])
