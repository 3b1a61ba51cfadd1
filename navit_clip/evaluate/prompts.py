"""Class names and prompt templates for zero-shot classification: shipped lists or files.

Shipped (navit_clip/evaluate/data/):
  class names  "imagenet"    the 1000 ImageNet-1k classes, in label order, as CLIP names them
  templates    "clip"        CLIP's 80 ImageNet prompt templates
               "clip_short"  the 7-template subset from CLIP's prompt-engineering notebook

A custom list is a file: .txt with one entry per line (empty lines and lines starting with
"#" skipped), or .json holding a list, or an object with a "classnames" / "templates" key.
Templates hold exactly one "{}" where the class name goes.
"""

from __future__ import annotations

import importlib.resources
import json

from navit_clip import storage

CLASSNAMES = {"imagenet": "imagenet_classes.txt"}
TEMPLATES = {"clip": "clip_templates.txt", "clip_short": "clip_templates_short.txt"}


def _lines(text: str) -> list[str]:
  return [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]


def _read(spec: str, shipped: dict[str, str], key: str) -> list[str]:
  if spec in shipped:
    data = importlib.resources.files("navit_clip.evaluate") / "data" / shipped[spec]
    return _lines(data.read_text(encoding="utf-8"))
  if not storage.isfile(spec):
    raise FileNotFoundError(f"{key} {spec!r} is neither a shipped list ({', '.join(shipped)}) "
                            "nor a file")
  with storage.open(spec, "r") as f:
    text = f.read()
  if not spec.endswith(".json"):
    return _lines(text)
  data = json.loads(text)
  if isinstance(data, dict):
    if key not in data:
      raise ValueError(f"{spec!r} is a JSON object without a {key!r} key")
    data = data[key]
  if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
    raise ValueError(f"{spec!r}: {key} must be a JSON list of strings")
  return [s.strip() for s in data]


def load_classnames(spec: str) -> list[str]:
  """Class names from a shipped list name or a file (see module docstring)."""
  names = _read(spec, CLASSNAMES, "classnames")
  if not names:
    raise ValueError(f"classnames {spec!r} is empty")
  return names


def load_templates(spec: str) -> list[str]:
  """Prompt templates from a shipped list name or a file; each must hold one "{}"."""
  templates = _read(spec, TEMPLATES, "templates")
  if not templates:
    raise ValueError(f"templates {spec!r} is empty")
  for t in templates:
    if t.count("{}") != 1:
      raise ValueError(f"template {t!r} in {spec!r} must hold exactly one '{{}}'")
  return templates
