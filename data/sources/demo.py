"""Synthetic shapes-and-colours images with captions: the dataset of `navit-clip demo`.

Each example is one upright shape (circle, square, triangle, cross or star) filled with
one of 8 colours, drawn with an outline of about a fifth of its radius on a plain black or
white background (never its own colour); the outline is white on black and black on
white, so the shape's silhouette always stands out, whatever its colour. Light pixel noise
is added. The shape's radius is 0.28-0.34 (small) or 0.38-0.46 (large) of the image's short
side, anywhere in the image; each image has a native size and aspect ratio of its own.
A caption says what it shows in varied words. Everything is a pure function of
`(seed, example_id)`, so the source is random access (a Grain `RandomAccessDataSource`),
needs no files, and any example can be regenerated on its own.

Splits. Both splits draw from the same generator and differ only in their example ids:
the train split holds ids `[0, num_examples)` and the eval split ids
`[EVAL_ID_OFFSET, EVAL_ID_OFFSET + num_examples)`. The ranges never overlap (train may hold
at most `EVAL_ID_OFFSET` examples), so the eval images are held out: no eval example is a
train example. The id also seeds the example, so ids are unique across both splits.

Labels. `shape` indexes `SHAPES`, `color` (the shape's colour) and `background` index
`COLORS`, and the combined class is `label = shape * len(COLORS) + color`, named
`LABEL_NAMES[label] == f"{COLORS[color]} {SHAPES[shape]}"`.

Captions always name the shape and its colour; the background (dark for black, light for
white, so that every colour word in a caption is the shape's), size (small / large),
position and aspect (wide / tall) appear in some of them; the outline is how every shape is
drawn and is not named. The word "square" names only the shape, never an aspect.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
LABEL_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)
NUM_CLASSES = len(LABEL_NAMES)

SPLITS = ("train", "eval")
EVAL_ID_OFFSET = 1_000_000_000
DEFAULT_NUM_EXAMPLES = {"train": 50_000, "eval": 1_000}

COLOR_RGB = ((220, 30, 30), (30, 160, 50), (35, 70, 225), (240, 215, 30), (135, 45, 175),
             (245, 135, 20), (240, 240, 240), (20, 20, 20))  # nominal RGB of each of COLORS

_RGB = np.array(COLOR_RGB, np.int16)
_WHITE, _BLACK = COLORS.index("white"), COLORS.index("black")
_COLOR_JITTER = 12  # max per-channel offset of an example's colours from _RGB
_NOISE = 8  # max per-pixel, per-channel noise
_MAX_SIDE = 256  # largest image side allowed, px
_NOISE_TILE = _MAX_SIDE + 64  # side of the shared noise tile, px
_SMALL_FRAC = (0.28, 0.34)  # shape radius / short image side, small shapes
_LARGE_FRAC = (0.38, 0.46)  # same, large shapes
_MIN_RADIUS = 4.0  # px
_OUTLINE_FRAC = 0.2  # outline width / shape radius

_SIZE_WORDS = (("small", "little", "tiny"), ("large", "big", "huge"))
_ASPECT_WORDS = {"wide": ("wide", "panoramic"), "tall": ("tall", "narrow")}
_ASPECT_THRESHOLD = 1.4  # w/h above this is "wide", h/w above it "tall"
_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ")
_BACKDROPS = ("background", "backdrop")
# Captions call a black background dark and a white one light, so that a colour word
# always names the shape's colour: "a white star on a dark background".
_BACKGROUND_WORDS = {_BLACK: "dark", _WHITE: "light"}

# Captions name a shape with its colour, so a shape's prompts do too, one per colour: its
# class embedding is their mean (top-1 80% instead of 78% with colourless prompts).
_SHAPE_TEMPLATES = ("a red {}.", "a green {}.", "a blue {}.", "a yellow {}.", "a purple {}.",
                    "an orange {}.", "a white {}.", "a black {}.")
# Colour and label names may start with a vowel ("orange"), so their templates put no
# article right before "{}"; shape names all start with a consonant.
_COLOR_TEMPLATES = ("something {}.", "{} shape.", "{} object.", "a photo of something {}.",
                    "a picture of something {}.")
_LABEL_TEMPLATES = ("{}.", "{} shape.", "small {}.", "big {}.")

_NUM_SCENE_UNIFORMS = 11  # uniforms that _sample_scene uses for the image
_NUM_CAPTION_UNIFORMS = 8  # uniforms that _caption uses for the wording


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
  """A zero-shot classification task over the demo images.

  Attributes:
    label_field: the record field holding the true class index.
    classnames: class index -> name, substituted for "{}" in each template.
    templates: prompt templates, each with exactly one "{}".
  """

  label_field: str
  classnames: tuple[str, ...]
  templates: tuple[str, ...]

  def prompts(self, class_index: int) -> list[str]:
    """The prompts for one class, one per template."""
    return [t.format(self.classnames[class_index]) for t in self.templates]


def zero_shot_tasks() -> dict[str, ZeroShotTask]:
  """Task name -> ZeroShotTask: "shape" (5 classes), "color" (8), "label" (40)."""
  return {
      "shape": ZeroShotTask("shape", SHAPES, _SHAPE_TEMPLATES),
      "color": ZeroShotTask("color", COLORS, _COLOR_TEMPLATES),
      "label": ZeroShotTask("label", LABEL_NAMES, _LABEL_TEMPLATES),
  }


@dataclasses.dataclass(frozen=True)
class _Scene:
  """Everything that an example's image and caption are drawn from."""

  shape: int
  color: int
  background: int
  large: bool
  height: int
  width: int
  center: tuple[float, float]  # (x, y) in pixels
  radius: float  # pixels
  rgb: tuple[tuple[int, int, int], tuple[int, int, int]]  # (shape, background), jittered
  noise_offset: tuple[int, int]  # (row, col) into the noise tile
  caption_u: np.ndarray  # float64 [_NUM_CAPTION_UNIFORMS], uniforms for the wording


def _pick(u: float, n: int) -> int:
  """Maps a uniform in [0, 1) to an index in [0, n)."""
  return min(int(u * n), n - 1)


def _sample_scene(seed: int, example_id: int, min_side: int, max_side: int,
                  max_aspect: float) -> _Scene:
  """Draws an example's scene from one generator keyed on (seed, example_id)."""
  rng = np.random.default_rng((seed, example_id))
  u = rng.random(_NUM_SCENE_UNIFORMS + _NUM_CAPTION_UNIFORMS)
  jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=(2, 3))
  shape = _pick(u[0], len(SHAPES))
  color = _pick(u[1], len(COLORS))
  # Black or white, whichever the shape is not; either for the other colours.
  background = (_BLACK if color == _WHITE else _WHITE if color == _BLACK else
                (_WHITE, _BLACK)[_pick(u[2], 2)])
  # Aspect log-uniform in [1/max_aspect, max_aspect]; long side log-uniform in the range
  # that keeps the short side >= min_side.
  aspect = math.exp((2 * u[3] - 1) * math.log(max_aspect))
  stretch = max(aspect, 1 / aspect)
  lo = min_side * stretch
  long_side = int(round(math.exp(math.log(lo) + u[4] * (math.log(max_side) - math.log(lo)))))
  short_side = max(min_side, math.ceil(long_side / max_aspect), int(round(long_side / stretch)))
  height, width = (short_side, long_side) if aspect >= 1 else (long_side, short_side)
  large = bool(u[5] < 0.5)
  lo_frac, hi_frac = _LARGE_FRAC if large else _SMALL_FRAC
  radius = max(_MIN_RADIUS, (lo_frac + u[6] * (hi_frac - lo_frac)) * min(height, width))
  center = (radius + u[7] * (width - 2 * radius), radius + u[8] * (height - 2 * radius))
  rgb = np.clip(_RGB[[color, background]] + jitter, _NOISE, 255 - _NOISE)
  span = _NOISE_TILE - max_side
  noise_offset = (_pick(u[9], span), _pick(u[10], span))
  return _Scene(shape, color, background, large, height, width, center, radius,
                (tuple(map(int, rgb[0])), tuple(map(int, rgb[1]))), noise_offset,
                u[_NUM_SCENE_UNIFORMS:])


def _star_points(n: int, outer: float, inner: float) -> list[tuple[float, float]]:
  """Vertices (unit-free) of an n-pointed star, alternating outer and inner radius."""
  return [((outer if k % 2 == 0 else inner) * math.sin(k * math.pi / n),
           -(outer if k % 2 == 0 else inner) * math.cos(k * math.pi / n))
          for k in range(2 * n)]


# Upright polygons inside the unit circle (x right, y down), scaled by the radius, so a
# shape never leaves its image nor covers a corner.
_POLYGONS = {
    "square": [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
    "triangle": _star_points(3, 1.0, 0.5),  # the inner points lie on the edges
    "cross": [(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3),
              (0.3, 0.3), (0.3, 0.95), (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3),
              (-0.95, -0.3), (-0.3, -0.3)],
    "star": _star_points(5, 1.0, 0.42),
}


def _noise_tile() -> np.ndarray:
  """uint8 [_NOISE_TILE, _NOISE_TILE, 3]: noise in [-_NOISE, _NOISE], stored mod 256."""
  noise = np.random.default_rng(0).integers(-_NOISE, _NOISE + 1,
                                            size=(_NOISE_TILE, _NOISE_TILE, 3))
  return noise.astype(np.int8).view(np.uint8)


_NOISE_U8 = _noise_tile()


def _render(scene: _Scene) -> np.ndarray:
  """uint8 [H, W, 3]: the scene's outlined shape on its background, plus noise.

  The outline, inside the shape's edge, is nominal black on white backgrounds and nominal
  white on black ones. Drawing is not anti-aliased, so every pixel is one of the two
  jittered colours or the outline's, each channel in [_NOISE, 255 - _NOISE]; adding the
  noise mod 256 therefore never wraps.
  """
  img = Image.new("RGB", (scene.width, scene.height), scene.rgb[1])
  draw = ImageDraw.Draw(img)
  (cx, cy), r = scene.center, scene.radius
  outline = COLOR_RGB[_BLACK if scene.background == _WHITE else _WHITE]
  style = {"fill": scene.rgb[0], "outline": outline,
           "width": max(1, round(_OUTLINE_FRAC * r))}
  name = SHAPES[scene.shape]
  if name == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), **style)
  else:
    draw.polygon([(cx + x * r, cy + y * r) for x, y in _POLYGONS[name]], **style)
  out = np.array(img)
  oy, ox = scene.noise_offset
  out += _NOISE_U8[oy:oy + scene.height, ox:ox + scene.width]
  return out


def _with_article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position_phrase(scene: _Scene) -> str:
  """"in the top left corner", "at the bottom", "on the right", "in the middle" ...

  From the shape's centre, by thirds of the image's height and width.
  """
  (cx, cy) = scene.center
  col = ("left", None, "right")[_pick(cx / scene.width, 3)]
  row = ("top", None, "bottom")[_pick(cy / scene.height, 3)]
  if row and col:
    return f"in the {row} {col} corner"
  if row:
    return f"at the {row}"
  return f"on the {col}" if col else "in the middle"


def _caption(scene: _Scene) -> str:
  """A caption naming the scene's shape and colour, worded from the scene's uniforms."""
  u = scene.caption_u
  shape, color = SHAPES[scene.shape], COLORS[scene.color]
  bg = _BACKGROUND_WORDS[scene.background]
  size = _SIZE_WORDS[scene.large][_pick(u[0], 3)]
  ratio = scene.width / scene.height
  aspect = ("wide" if ratio > _ASPECT_THRESHOLD else
            "tall" if ratio < 1 / _ASPECT_THRESHOLD else None)
  aspect_word = _ASPECT_WORDS[aspect][_pick(u[1], 2)] if aspect and u[2] < 0.6 else None
  noun = f"{size} {color} {shape}" if u[3] < 0.6 else f"{color} {shape}"
  bg_phrase = f"{aspect_word} {bg}" if aspect_word else bg
  backdrop = _BACKDROPS[_pick(u[5], 2)]
  prefix = _PREFIXES[_pick(u[6], len(_PREFIXES))]
  form = _pick(u[4], 6)
  if form == 0:
    return f"{prefix}{_with_article(noun)} on {_with_article(bg_phrase)} {backdrop}"
  if form == 1:
    return f"{noun}, {bg_phrase} {backdrop}"
  if form == 2:
    text = f"{_with_article(noun)} {_position_phrase(scene)}"
    return f"{text} of {_with_article(aspect_word)} picture" if aspect_word else text
  if form == 3:
    return f"{prefix}{_with_article(noun)}"
  if form == 4:
    return f"{_with_article(bg_phrase)} {backdrop} with {_with_article(noun)}"
  thing = _with_article(f"{size} {shape}" if u[7] < 0.5 else shape)
  lead = (f"something {color}" if u[5] < 1 / 3 else
          _with_article(f"{color} {'shape' if u[5] < 2 / 3 else 'object'}"))
  return f"{lead}: {thing} on {_with_article(bg)} {backdrop}"


class DemoSource:
  """Random-access Grain data source of synthetic captioned shape images.

  Records are dicts:
    image       uint8 [H, W, 3]  H, W in [min_side, max_side], H/W in
                                 [1/max_aspect, max_aspect]
    caption     str
    example_id  int   the split's id range starts at 0 (train) or EVAL_ID_OFFSET (eval)
    shape       int   index into SHAPES
    color       int   the shape's colour, index into COLORS
    background  int   index into COLORS: white or black, != color
    label       int   shape * len(COLORS) + color, index into LABEL_NAMES

  The source is picklable and its repr names everything that defines its records, as
  Grain needs for worker processes and checkpoints.
  """

  def __init__(self, split: str = "train", num_examples: int | None = None, seed: int = 0,
               min_side: int = 24, max_side: int = 256, max_aspect: float = 2.5):
    """Builds a split.

    Args:
      split: "train" or "eval".
      num_examples: number of records; DEFAULT_NUM_EXAMPLES[split] if None. At most
        EVAL_ID_OFFSET, so that the splits stay disjoint.
      seed: non-negative int; the same seed gives the same records.
      min_side, max_side: range of image sides in pixels,
        8 <= min_side <= max_side <= 256.
      max_aspect: largest long/short side ratio, >= 1; max_side / min_side must allow it.
    """
    if split not in SPLITS:
      raise ValueError(f"DemoSource split must be one of {SPLITS}, got {split!r}")
    if num_examples is None:
      num_examples = DEFAULT_NUM_EXAMPLES[split]
    if not 0 < num_examples <= EVAL_ID_OFFSET:
      raise ValueError(
          f"DemoSource num_examples must be in [1, {EVAL_ID_OFFSET}], got {num_examples}")
    if seed < 0:
      raise ValueError(f"DemoSource seed must be >= 0, got {seed}")
    if not 8 <= min_side <= max_side <= _MAX_SIDE:
      raise ValueError("DemoSource needs 8 <= min_side <= max_side <= "
                       f"{_MAX_SIDE}, got min_side={min_side}, max_side={max_side}")
    if not 1.0 <= max_aspect <= max_side / min_side:
      raise ValueError(f"DemoSource max_aspect must be in [1, max_side / min_side = "
                       f"{max_side / min_side:g}], got {max_aspect}")
    self.split = split
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.min_side, self.max_side, self.max_aspect = int(min_side), int(max_side), max_aspect
    self.id_offset = EVAL_ID_OFFSET if split == "eval" else 0

  def __len__(self) -> int:
    return self.num_examples

  def _scene(self, index) -> _Scene:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"DemoSource({self.split!r}) index {index} out of range "
                       f"[0, {self.num_examples})")
    return _sample_scene(self.seed, self.id_offset + index, self.min_side, self.max_side,
                         self.max_aspect)

  def caption(self, index) -> str:
    """The record's caption, without drawing its image."""
    return _caption(self._scene(index))

  def __getitem__(self, index) -> dict:
    scene = self._scene(index)
    return {
        "image": _render(scene),
        "caption": _caption(scene),
        "example_id": self.id_offset + int(index),
        "shape": scene.shape,
        "color": scene.color,
        "background": scene.background,
        "label": scene.shape * len(COLORS) + scene.color,
    }

  def __repr__(self) -> str:
    return (f"DemoSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"seed={self.seed}, min_side={self.min_side}, max_side={self.max_side}, "
            f"max_aspect={self.max_aspect})")


def caption_corpus(n: int, seed: int = 0) -> Iterator[str]:
  """The captions of `DemoSource("train", seed=seed)` records 0..n-1, in order, lazily.

  Images are not drawn, so this is fast: the text to train the demo's tokenizer on.
  """
  if not 0 < n <= EVAL_ID_OFFSET:
    raise ValueError(f"caption_corpus n must be in [1, {EVAL_ID_OFFSET}], got {n}")
  source = DemoSource("train", num_examples=n, seed=seed)
  return (source.caption(index) for index in range(n))
