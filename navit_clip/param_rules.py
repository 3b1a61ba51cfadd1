"""Parameter names and the one regex-rule mechanism over them.

Parameters are named by their path in the parameter pytree, joined with "/", e.g.
"image/encoder/blocks/0/attn/query/kernel". Rules written "regex=value;regex=value" map
names to values, the first rule whose regex matches the whole name (`re.fullmatch`) wins.
Learning-rate and weight-decay multipliers and freezing (navit_clip.optim) and sharding
(navit_clip.sharding) are all such rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
from flax import nnx

V = TypeVar("V")


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  raise TypeError(f"cannot name pytree key {key!r} of type {type(key).__name__}")


def flatten_names(tree: Any) -> Any:
  """The pytree of "/"-joined path names of `tree`'s leaves, with `tree`'s structure.

  Works on nested dicts, lists and tuples, and on the nnx.State of
  `nnx.split(model, nnx.Param)`, whether its leaves are nnx.Variables or plain arrays: a
  Variable is named by its path (without its internal "value" field), so
  `model.image.query.kernel` is "image/query/kernel" either way.
  """

  def name(path, leaf):
    joined = "/".join(_key_name(k) for k in path)
    if isinstance(leaf, nnx.Variable):
      return jax.tree.map(lambda _: joined, leaf)
    return joined

  return jax.tree.map_with_path(name, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def split_rules(spec: str, what: str, value: str = "value") -> list[tuple[str, str]]:
  """"regex=value;regex=value" -> [(regex, value text)]; "" gives [].

  The value follows the last "=" of each rule, so regexes may contain "=". Raises
  ValueError naming `what` (e.g. "lr_mults"), the rule and the expected form
  ("regex=<value>") for a malformed rule or regex.
  """
  rules = []
  for rule in filter(None, (r.strip() for r in spec.split(";"))):
    pattern, sep, text = rule.rpartition("=")
    if not sep or not pattern:
      raise ValueError(f"{what} rule {rule!r} is not 'regex={value}'")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{what} rule {rule!r}: bad regex {pattern!r}: {e}") from e
    rules.append((pattern, text.strip()))
  return rules


def parse_multipliers(spec: str, what: str) -> list[tuple[str, float]]:
  """"regex=mult;regex=mult" -> [(regex, mult)], mults floats >= 0; "" gives [].

  Raises ValueError naming `what` (e.g. "lr_mults") and the rule for a malformed rule, a
  bad regex or a multiplier that is not a float >= 0.
  """
  rules = []
  for pattern, text in split_rules(spec, what, "multiplier"):
    try:
      mult = float(text)
    except ValueError as e:
      raise ValueError(f"{what} rule {pattern}={text}: bad multiplier {text!r}") from e
    if not mult >= 0:
      raise ValueError(f"{what} rule {pattern}={text}: multiplier must be >= 0")
    rules.append((pattern, mult))
  return rules


def first_match(name: str, rules: Sequence[tuple[str, V]], default: V) -> V:
  """The value of the first rule whose regex matches all of `name`, else `default`."""
  for pattern, value in rules:
    if re.fullmatch(pattern, name):
      return value
  return default
