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
  assert ratio.min() >= 1 / 4 and ratio.max() <= 4
  # The ranges are used, not just respected.
  assert ratio.min() < 1 / 3 and ratio.max() > 3
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
    assert ds.COLORS[color] in words, r["caption"]
    assert set(words) & set(ds.COLORS) <= {ds.COLORS[color], ds.COLORS[bg]}, r["caption"]
    # A corner shows the background; the shape's colour covers some pixels.
    img = r["image"].astype(np.int32)
    rgb = np.array(ds.COLOR_RGB)
    nearest = np.abs(img[..., None, :] - rgb).sum(-1).argmin(-1)
    assert nearest[0, 0] == bg
    assert (nearest == color).sum() >= 16


def test_every_class_occurs(train):
  assert {r["shape"] for r in train} == set(range(len(ds.SHAPES)))
  assert {r["color"] for r in train} == set(range(len(ds.COLORS)))
  assert {r["background"] for r in train} == set(range(len(ds.COLORS)))


def test_captions_vary_and_corpus_matches_source(train):
  captions = [r["caption"] for r in train]
  assert len(set(captions)) > N // 2
  assert any(w in _words(c) for c in captions for w in ("wide", "tall"))
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
