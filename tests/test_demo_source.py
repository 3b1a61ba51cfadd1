"""Tests for the synthetic demo dataset (navit_clip.data.sources.demo)."""

import pickle
import re

import grain
import numpy as np
import pytest

from navit_clip.data.sources import demo as ds

N = 240  # records per split in these tests: enough for every class, fast on one core


@pytest.fixture(scope="module")
def train():
  return [ds.DemoSource("train", num_examples=N)[i] for i in range(N)]


@pytest.fixture(scope="module")
def held_out():
  return [ds.DemoSource("eval", num_examples=N)[i] for i in range(N)]


def _words(text):
  return re.findall(r"[a-z]+", text.lower())


def test_record_fields_dtypes_and_shapes(train):
  for r in train[:20]:
    assert set(r) == {"image", "caption", "example_id", "shape", "color", "background",
                      "label"}
    img = r["image"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.flags.c_contiguous and img.flags.writeable
    assert isinstance(r["caption"], str) and r["caption"]
    for key in ("example_id", "shape", "color", "background", "label"):
      assert type(r[key]) is int, key


def test_same_index_same_record_and_seed_changes_it():
  a = ds.DemoSource("train", num_examples=50, seed=3)
  b = pickle.loads(pickle.dumps(ds.DemoSource("train", num_examples=50, seed=3)))
  other = ds.DemoSource("train", num_examples=50, seed=4)
  for i in (0, 17, 49):
    ra, rb = a[i], b[np.int64(i)]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    assert {k: v for k, v in ra.items() if k != "image"} == (
        {k: v for k, v in rb.items() if k != "image"})
  assert [a[i]["caption"] for i in range(10)] != [other[i]["caption"] for i in range(10)]


def test_splits_are_disjoint(train, held_out):
  train_ids = [r["example_id"] for r in train]
  eval_ids = [r["example_id"] for r in held_out]
  assert train_ids == list(range(N))
  assert eval_ids == list(range(ds.EVAL_ID_OFFSET, ds.EVAL_ID_OFFSET + N))
  train_pixels = {r["image"].tobytes() for r in train}
  assert not any(r["image"].tobytes() in train_pixels for r in held_out)
  with pytest.raises(ValueError, match="num_examples"):
    ds.DemoSource("train", num_examples=ds.EVAL_ID_OFFSET + 1)


def test_sizes_and_aspect_ratios_in_range(train):
  hs = np.array([r["image"].shape[0] for r in train])
  ws = np.array([r["image"].shape[1] for r in train])
  assert hs.min() >= 24 and ws.min() >= 24 and hs.max() <= 256 and ws.max() <= 256
  ratio = ws / hs
  assert ratio.min() >= 1 / 2.5 and ratio.max() <= 2.5  # the default max_aspect
  # The ranges are used, not just respected.
  assert ratio.min() < 1 / 2 and ratio.max() > 2
  assert min(hs.min(), ws.min()) < 40 and max(hs.max(), ws.max()) > 200

  small = ds.DemoSource("train", num_examples=60, min_side=16, max_side=64, max_aspect=2)
  for i in range(60):
    h, w, _ = small[i]["image"].shape
    assert 16 <= min(h, w) and max(h, w) <= 64 and max(h, w) <= 2 * min(h, w)


def test_labels_match_caption_and_pixels(train, held_out):
  for r in train + held_out:
    shape, color, bg = r["shape"], r["color"], r["background"]
    assert bg != color
    assert r["label"] == shape * len(ds.COLORS) + color
    assert ds.LABEL_NAMES[r["label"]] == f"{ds.COLORS[color]} {ds.SHAPES[shape]}"
    words = _words(r["caption"])
    assert [w for w in words if w in ds.SHAPES] == [ds.SHAPES[shape]], r["caption"]
    # Every colour word is the shape's; the background is "dark" (black) or "light" (white).
    assert set(words) & set(ds.COLORS) == {ds.COLORS[color]}, r["caption"]
    assert set(words) & {"dark", "light"} <= {{"black": "dark", "white": "light"}[
        ds.COLORS[bg]]}, r["caption"]
    # A corner shows the background; the shape's colour covers some pixels.
    img = r["image"].astype(np.int32)
    rgb = np.array(ds.COLOR_RGB)
    nearest = np.abs(img[..., None, :] - rgb).sum(-1).argmin(-1)
    assert nearest[0, 0] == bg
    assert (nearest == color).sum() >= 16


def test_every_class_occurs_on_black_and_white(train):
  assert {r["shape"] for r in train} == set(range(len(ds.SHAPES)))
  assert {r["color"] for r in train} == set(range(len(ds.COLORS)))
  assert {ds.COLORS[r["background"]] for r in train} == {"white", "black"}
  for color in range(len(ds.COLORS)):  # each colour but white and black on both
    backgrounds = {ds.COLORS[r["background"]] for r in train if r["color"] == color}
    assert backgrounds == {"white", "black"} - {ds.COLORS[color]}, ds.COLORS[color]


def test_shape_is_outlined_against_its_background(train):
  """Just inside the silhouette's edge lies the outline: black on white, white on black."""
  rgb = np.array(ds.COLOR_RGB)
  for r in train[:60]:
    nearest = np.abs(r["image"].astype(np.int32)[..., None, :] - rgb).sum(-1).argmin(-1)
    is_bg = nearest == r["background"]
    inside = ~is_bg
    # Pixels inside the silhouette with a background pixel beside them: its edge.
    edge = inside & (np.roll(is_bg, 1, 0) | np.roll(is_bg, -1, 0) | np.roll(is_bg, 1, 1)
                     | np.roll(is_bg, -1, 1))
    outline = {"white": "black", "black": "white"}[ds.COLORS[r["background"]]]
    assert edge.sum() > 0
    assert (nearest[edge] == ds.COLORS.index(outline)).mean() > 0.9, r["caption"]


def test_shapes_are_upright():
  """A triangle's apex is at the top, a square's sides follow the image's axes."""
  source = ds.DemoSource("train", num_examples=N)
  for i in range(N):
    r = source[i]
    name = ds.SHAPES[r["shape"]]
    if name not in ("triangle", "square"):
      continue
    inside = np.abs(r["image"].astype(np.int32)
                    - np.array(ds.COLOR_RGB[r["background"]])).sum(-1) > 100
    rows = np.flatnonzero(inside.any(1))
    widths = inside[rows].sum(1)
    if name == "triangle":  # narrow at the top, wide at the bottom
      assert widths[:2].mean() < widths[-2:].mean() / 3, r["caption"]
    else:  # the same width from top to bottom
      assert widths.min() >= widths.max() - 2, r["caption"]


def test_captions_vary_and_corpus_matches_source(train):
  captions = [r["caption"] for r in train]
  assert len(set(captions)) > N // 2
  assert any(w in _words(c) for c in captions for w in ("wide", "tall"))
  assert any("dark" in _words(c) for c in captions)
  assert any("light" in _words(c) for c in captions)
  assert list(ds.caption_corpus(N)) == captions
  with pytest.raises(ValueError, match="caption_corpus n"):
    ds.caption_corpus(0)


def test_zero_shot_prompts_are_in_the_caption_vocabulary():
  tasks = ds.zero_shot_tasks()
  assert set(tasks) == {"shape", "color", "label"}
  assert tasks["shape"].classnames == ds.SHAPES
  assert tasks["color"].classnames == ds.COLORS
  assert tasks["label"].classnames == ds.LABEL_NAMES
  vocabulary = {w for c in ds.caption_corpus(2000) for w in _words(c)}
  for name, task in tasks.items():
    for i in range(len(task.classnames)):
      for prompt in task.prompts(i):
        assert set(_words(prompt)) <= vocabulary, prompt
        assert not re.search(r"\ba [aeiou]", prompt), prompt
    for template in task.templates:
      assert template.count("{}") == 1, (name, template)
  # Shape prompts name each colour once, as the captions name a shape with its colour.
  assert sorted(_words(" ".join(tasks["shape"].templates))) == sorted(
      ["a"] * 7 + ["an"] + list(ds.COLORS))


def test_grain_source_protocol():
  source = ds.DemoSource("eval", num_examples=8)
  assert isinstance(source, grain.sources.RandomAccessDataSource)
  assert "eval" in repr(source) and "num_examples=8" in repr(source)
  records = list(grain.MapDataset.source(source).map(lambda r: r["example_id"]))
  assert records == list(range(ds.EVAL_ID_OFFSET, ds.EVAL_ID_OFFSET + 8))


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "test"}, "split"),
    ({"seed": -1}, "seed"),
    ({"min_side": 4}, "min_side"),
    ({"max_side": 512}, "max_side"),
    ({"min_side": 100, "max_side": 200, "max_aspect": 4}, "max_aspect"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ds.DemoSource(**kwargs)


def test_index_out_of_range_raises():
  source = ds.DemoSource("train", num_examples=5)
  with pytest.raises(IndexError, match="out of range"):
    source[5]
