"""Synthetic shapes whose class is what a square resize distorts: the data of `navit-clip study`.

Each example is one bright, axis-aligned shape on a dark background, in an image of its own
aspect ratio (log-uniform in [1/max_aspect, max_aspect]) and size (geometric-mean side
log-uniform in [min_side, max_side]). The caption names the shape with its own
proportions: a circle or a square (1:1), or a wide (2:1) or tall (1:2) ellipse or
rectangle, whatever the image's aspect ratio. Squashing the image to a square divides the
shape's width / height by the image's: in a 2:1 image a wide rectangle becomes a square,
in a 1:2 image a circle becomes a wide ellipse, so after the squash the proportions no
longer tell the classes apart (with images up to 3:1, the best guess from the squashed
proportions is right about 54% of the time); at native aspect they always do. The kind
(curved or cornered) survives the squash. The shape's size is 0.40-0.65 of the image's
short side (geometric mean of its width and height).

The image has no pixel noise: noise drawn at native size would show the squash through its
grain. Everything is a pure function of `(seed, example_id)`, so the source is random
access (a Grain `RandomAccessDataSource`) and needs no files.

Splits: train holds ids `[0, num_examples)`, eval ids `[EVAL_ID_OFFSET, ...)`, as
`navit_clip.data.sources.demo`. Labels: `shape` indexes SHAPES, `shape = kind * 3 +
proportion` with `kind` indexing KINDS and `proportion` PROPORTIONS.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw

from navit_clip.data.sources.demo import EVAL_ID_OFFSET, ZeroShotTask

SHAPES = ("circle", "wide ellipse", "tall ellipse", "square", "wide rectangle",
          "tall rectangle")
PROPORTIONS = ("even", "wide", "tall")  # shape % 3: the shape's width / height 1, 2, 1/2
KINDS = ("ellipse", "rectangle")  # shape // 3
SPLITS = ("train", "eval")
DEFAULT_NUM_EXAMPLES = {"train": 50_000, "eval": 600}
# The best proportion accuracy left after squashing to a square: each image's squashed
# proportions classified as their most frequent class (measured on 60,000 scenes of the
# default sizes: 54.4%). No square-resize model can do better on the proportions.
SQUASHED_BEST_PROPORTION = 0.544

_WIDTH_OVER_HEIGHT = (1.0, 2.0, 0.5)  # of each of PROPORTIONS
_PROPORTION_JITTER = 0.05  # each example's proportion is off by at most this factor
_SIZE_FRAC = (0.40, 0.65)  # sqrt(shape width * height) / the image's short side
_MARGIN = 1.0  # px kept between the shape and the image border
_MAX_SIDE = 512
_BACKGROUND = (0, 70)  # per-channel range of the background colour
_FOREGROUND = (170, 255)  # per-channel range of the shape's colour

_CAPTION_FORMS = ("a {}", "a photo of a {}", "a {} on a dark background", "an image of a {}",
                  "a picture showing a {}")
_TEMPLATES = ("a {}", "a photo of a {}", "an image of a {}", "a picture of a {}")


def zero_shot_tasks() -> dict[str, ZeroShotTask]:
  """Task name -> ZeroShotTask: "shape" (the 6 SHAPES)."""
  return {"shape": ZeroShotTask("shape", SHAPES, _TEMPLATES)}


def shape_accuracies(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Accuracies of predicted shapes (int [N] indices into SHAPES) against `labels`: top1
  (all 6), proportion (the 3 PROPORTIONS: what a square resize distorts) and kind (the 2
  KINDS: what it keeps)."""
  predicted, labels = np.asarray(predicted), np.asarray(labels)
  if predicted.shape != labels.shape or not labels.size:
    raise ValueError(f"shape_accuracies needs aligned non-empty [N] arrays, got "
                     f"{predicted.shape} and {labels.shape}")
  return {"top1": float(np.mean(predicted == labels)),
          "proportion": float(np.mean(predicted % 3 == labels % 3)),
          "kind": float(np.mean(predicted // 3 == labels // 3))}


@dataclasses.dataclass(frozen=True)
class _Scene:
  """Everything an example's image and caption are drawn from."""

  shape: int
  height: int
  width: int
  box: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the shape, pixels
  colors: tuple[tuple[int, ...], tuple[int, ...]]  # (shape, background) RGB
  caption_form: int


def _pick(u: float, n: int) -> int:
  """Maps a uniform in [0, 1) to an index in [0, n)."""
  return min(int(u * n), n - 1)


def _image_size(u_aspect: float, u_side: float, min_side: int, max_side: int,
                max_aspect: float) -> tuple[int, int]:
  """(height, width): aspect w/h log-uniform in [1/max_aspect, max_aspect], geometric-mean
  side sqrt(h * w) log-uniform in [min_side, max_side]."""
  half_log_aspect = (2 * u_aspect - 1) * math.log(max_aspect) / 2
  side = math.exp(math.log(min_side) + u_side * (math.log(max_side) - math.log(min_side)))
  return (max(8, int(round(side / math.exp(half_log_aspect)))),
          max(8, int(round(side * math.exp(half_log_aspect)))))


def _sample_scene(seed: int, example_id: int, min_side: int, max_side: int,
                  max_aspect: float) -> _Scene:
  """Draws an example's scene from one generator keyed on (seed, example_id)."""
  rng = np.random.default_rng((seed, example_id))
  u = rng.random(8)
  colors = (tuple(int(c) for c in rng.integers(*_FOREGROUND, size=3, endpoint=True)),
            tuple(int(c) for c in rng.integers(*_BACKGROUND, size=3, endpoint=True)))
  shape = _pick(u[0], len(SHAPES))
  height, width = _image_size(u[1], u[2], min_side, max_side, max_aspect)
  proportion = _WIDTH_OVER_HEIGHT[shape % 3] * (1 + _PROPORTION_JITTER * (2 * u[3] - 1))
  mean_side = (_SIZE_FRAC[0] + u[4] * (_SIZE_FRAC[1] - _SIZE_FRAC[0])) * min(height, width)
  box_w, box_h = mean_side * math.sqrt(proportion), mean_side / math.sqrt(proportion)
  fit = min(1.0, (width - 2 * _MARGIN) / box_w, (height - 2 * _MARGIN) / box_h)
  box_w, box_h = box_w * fit, box_h * fit  # smaller, never another proportion
  x0 = _MARGIN + u[5] * (width - 2 * _MARGIN - box_w)
  y0 = _MARGIN + u[6] * (height - 2 * _MARGIN - box_h)
  return _Scene(shape, height, width, (x0, y0, x0 + box_w, y0 + box_h), colors,
                _pick(u[7], len(_CAPTION_FORMS)))


def _render(scene: _Scene) -> np.ndarray:
  """uint8 [H, W, 3]: the scene's shape (not anti-aliased) on its background."""
  img = Image.new("RGB", (scene.width, scene.height), scene.colors[1])
  draw = ImageDraw.Draw(img)
  if scene.shape < 3:
    draw.ellipse(scene.box, fill=scene.colors[0])
  else:
    draw.rectangle(scene.box, fill=scene.colors[0])
  return np.array(img)


def _caption(scene: _Scene) -> str:
  """A caption naming the shape (with its proportions), in one of a few wordings."""
  return _CAPTION_FORMS[scene.caption_form].format(SHAPES[scene.shape])


class StudyShapesSource:
  """Random-access Grain data source of captioned shapes whose classes depend on aspect.

  Records are dicts:
    image       uint8 [H, W, 3]  sqrt(H * W) in [min_side, max_side] (up to rounding),
                                 W/H in [1/max_aspect, max_aspect]
    caption     str
    example_id  int   the split's ids start at 0 (train) or EVAL_ID_OFFSET (eval)
    shape       int   index into SHAPES
    proportion  int   shape % 3, index into PROPORTIONS
    kind        int   shape // 3, index into KINDS

  Picklable, and its repr names everything that defines its records (Grain workers and
  checkpoints need both).
  """

  def __init__(self, split: str = "train", num_examples: int | None = None, seed: int = 0,
               min_side: int = 64, max_side: int = 128, max_aspect: float = 3.0):
    """Builds a split.

    Args:
      split: "train" or "eval".
      num_examples: number of records; DEFAULT_NUM_EXAMPLES[split] if None, at most
        EVAL_ID_OFFSET.
      seed: non-negative int; the same seed gives the same records.
      min_side, max_side: range of the images' geometric-mean side sqrt(H * W) in pixels,
        16 <= min_side <= max_side <= 512.
      max_aspect: largest long/short side ratio, >= 1 (a side is at least 8 px).
    """
    if split not in SPLITS:
      raise ValueError(f"StudyShapesSource split must be one of {SPLITS}, got {split!r}")
    num_examples = DEFAULT_NUM_EXAMPLES[split] if num_examples is None else num_examples
    if not 0 < num_examples <= EVAL_ID_OFFSET:
      raise ValueError(f"StudyShapesSource num_examples must be in [1, {EVAL_ID_OFFSET}], "
                       f"got {num_examples}")
    if seed < 0:
      raise ValueError(f"StudyShapesSource seed must be >= 0, got {seed}")
    if not 16 <= min_side <= max_side <= _MAX_SIDE:
      raise ValueError(f"StudyShapesSource needs 16 <= min_side <= max_side <= {_MAX_SIDE}, "
                       f"got min_side={min_side}, max_side={max_side}")
    if not max_aspect >= 1.0:
      raise ValueError(f"StudyShapesSource max_aspect must be >= 1, got {max_aspect}")
    self.split, self.num_examples, self.seed = split, int(num_examples), int(seed)
    self.min_side, self.max_side, self.max_aspect = int(min_side), int(max_side), max_aspect
    self.id_offset = EVAL_ID_OFFSET if split == "eval" else 0

  def __len__(self) -> int:
    return self.num_examples

  def _scene(self, index) -> _Scene:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"StudyShapesSource({self.split!r}) index {index} out of range "
                       f"[0, {self.num_examples})")
    return _sample_scene(self.seed, self.id_offset + index, self.min_side, self.max_side,
                         self.max_aspect)

  def caption(self, index) -> str:
    """The record's caption, without drawing its image."""
    return _caption(self._scene(index))

  def __getitem__(self, index) -> dict:
    scene = self._scene(index)
    return {"image": _render(scene), "caption": _caption(scene),
            "example_id": self.id_offset + int(index), "shape": scene.shape,
            "proportion": scene.shape % 3, "kind": scene.shape // 3}

  def __repr__(self) -> str:
    return (f"StudyShapesSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"seed={self.seed}, min_side={self.min_side}, max_side={self.max_side}, "
            f"max_aspect={self.max_aspect})")


def caption_corpus(n: int, seed: int = 0) -> Iterator[str]:
  """The captions of `StudyShapesSource("train", seed=seed)` records 0..n-1, lazily: the
  text to train the study's tokenizer on (images are not drawn)."""
  if not 0 < n <= EVAL_ID_OFFSET:
    raise ValueError(f"caption_corpus n must be in [1, {EVAL_ID_OFFSET}], got {n}")
  source = StudyShapesSource("train", num_examples=n, seed=seed)
  return (source.caption(index) for index in range(n))
