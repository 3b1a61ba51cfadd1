"""Packing: properties of every packer, and resumable Grain iteration."""

import json

import grain
from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from data_fixtures import validate_batch
from navit_clip.data.batch import BatchSpec
from navit_clip.data.pack import ALGORITHMS, pack
from navit_clip.data.counters import skip_marker
from navit_clip.data.pack_dataset import (GRAIN_PACKERS, PackedBatchDataset, UngroupDataset,
                                          from_transfer, to_transfer)


def make_examples(lengths, spec, seed=0):
  """Per-image examples whose contents are derived from their id (easy to check)."""
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(lengths):
    gw = int(rng.integers(1, n + 1))
    ex = {"patches": rng.integers(0, 256, (n, spec.patch_dim), np.uint8),
          "positions": rng.integers(0, 50, (n, 2)).astype(np.int32),
          "grid_hw": np.array([-(-n // gw), gw], np.int32),
          "example_id": 1000 + i}
    if spec.text_len is not None:
      ex["text_tokens"] = rng.integers(1, 99, spec.text_len).astype(np.int32)
    if spec.num_classes is not None:
      ex["labels"] = (rng.random(spec.num_classes).round().astype(np.float32)
                      if spec.multi_label else int(rng.integers(spec.num_classes)))
    out.append(ex)
  return out


def check_batches(batches, examples, spec):
  """Every image exactly once, in its own contiguous segment, with all its fields."""
  by_id = {ex["example_id"]: ex for ex in examples}
  seen = []
  for batch in batches:
    validate_batch(batch, spec)
    for r in range(spec.batch_size):
      seg, mask = batch["segment_ids"][r], batch["image_mask"][r]
      k = int(mask.sum())
      assert mask.tolist() == [True] * k + [False] * (spec.max_images - k)
      real = int(np.count_nonzero(seg))
      # Images first, in slot order, each contiguous; padding after.
      expected = np.concatenate([np.full(len(by_id[batch["example_id"][r, j]]["patches"]),
                                         j + 1) for j in range(k)] + [np.zeros(0, int)])
      np.testing.assert_array_equal(seg[:real], expected)
      assert np.all(seg[real:] == 0)
      pad = seg == 0
      assert not batch["patches"][r][pad].any() and not batch["positions"][r][pad].any()
      assert not batch["grid_hw"][r][pad].any()
      assert np.all(batch["example_id"][r, k:] == -1)
      for j in range(k):
        ex = by_id[int(batch["example_id"][r, j])]
        tokens = seg == j + 1
        np.testing.assert_array_equal(batch["patches"][r][tokens], ex["patches"])
        np.testing.assert_array_equal(batch["positions"][r][tokens], ex["positions"])
        assert np.all(batch["grid_hw"][r][tokens] == ex["grid_hw"])
        if spec.text_len is not None:
          np.testing.assert_array_equal(batch["text_tokens"][r, j], ex["text_tokens"])
        if spec.num_classes is not None:
          np.testing.assert_array_equal(batch["labels"][r, j], ex["labels"])
        seen.append(int(batch["example_id"][r, j]))
      if spec.text_len is not None:
        assert not batch["text_tokens"][r, k:].any()
  assert sorted(seen) == sorted(by_id)  # nothing lost, nothing twice


@st.composite
def streams(draw):
  seq_len = draw(st.integers(1, 40))
  spec = BatchSpec(batch_size=draw(st.integers(1, 4)), seq_len=seq_len,
                   max_images=draw(st.integers(1, min(seq_len, 6))), patch_size=2,
                   channels=1, text_len=draw(st.sampled_from([None, 3])),
                   num_classes=draw(st.sampled_from([None, 4])),
                   multi_label=draw(st.booleans()))
  lengths = draw(st.lists(st.integers(1, seq_len), max_size=60))
  return spec, make_examples(lengths, spec, seed=draw(st.integers(0, 1000)))


@settings(max_examples=40, deadline=None)
@given(stream=streams(), algorithm=st.sampled_from(ALGORITHMS),
       window=st.integers(1, 20), bins=st.integers(1, 6))
def test_packer_properties(stream, algorithm, window, bins):
  spec, examples = stream
  batches = list(pack(examples, spec, algorithm, window=window, bins=bins))
  check_batches(batches, examples, spec)
  rows = sum(int(b["image_mask"].any(1).sum()) for b in batches)
  assert len(batches) == -(-rows // spec.batch_size)  # only the last batch has empty rows


@settings(max_examples=15, deadline=None)
@given(stream=streams(), packer=st.sampled_from(GRAIN_PACKERS), bins=st.integers(1, 6))
def test_wrapped_grain_packer_properties(stream, packer, bins):
  spec, examples = stream
  ds = PackedBatchDataset(grain.MapDataset.source(examples).to_iter_dataset(), spec,
                          packer=packer, bins=bins)
  check_batches(list(ds), examples, spec)


def realistic_lengths(n, seq_len, seed=0):
  """Patch counts of 4:3-ish images, side ~ U(64, 384) at patch 16, capped at seq_len."""
  rng = np.random.default_rng(seed)
  side = rng.uniform(64, 384, n)
  ratio = np.exp(rng.normal(np.log(4 / 3), 0.3, n))
  rows = np.maximum(1, np.round(side / np.sqrt(ratio) / 16))
  cols = np.maximum(1, np.round(side * np.sqrt(ratio) / 16))
  return np.minimum(rows * cols, seq_len).astype(int).tolist()


def test_window_best_fit_pads_less_than_first_fit():
  spec = BatchSpec(batch_size=8, seq_len=1024, max_images=16, patch_size=1, channels=1)
  examples = make_examples(realistic_lengths(2000, 1024), spec)
  padding = {}
  for algorithm in ALGORITHMS:
    batches = list(pack(examples, spec, algorithm, window=128, bins=4))
    real = sum(int(b["image_mask"].any(1).sum()) for b in batches) * spec.seq_len
    padding[algorithm] = 1 - sum(len(ex["patches"]) for ex in examples) / real
  assert padding["window_best_fit"] < 0.01
  assert padding["window_best_fit"] < padding["first_fit"]


def test_too_long_or_malformed_images_are_named():
  spec = BatchSpec(batch_size=2, seq_len=8, max_images=2, patch_size=1, channels=1)
  (ex,) = make_examples([9], BatchSpec(1, 9, 1, 1, 1))
  with pytest.raises(ValueError, match="example 1000: 9 patches"):
    list(pack([ex], spec))
  (ex,) = make_examples([3], spec)
  ex["positions"] = ex["positions"][:2]
  with pytest.raises(ValueError, match=r"positions must be \[3, 2\]"):
    list(pack([ex], spec))


@settings(max_examples=12, deadline=None)
@given(packer=st.sampled_from(ALGORITHMS + GRAIN_PACKERS), stop=st.integers(0, 12),
       seed=st.integers(0, 100))
def test_resumed_iterator_yields_the_same_batches(packer, stop, seed):
  spec = BatchSpec(batch_size=2, seq_len=24, max_images=4, patch_size=1, channels=2,
                   text_len=2)
  lengths = np.random.default_rng(seed).integers(1, 25, 80).tolist()
  source = grain.MapDataset.source(make_examples(lengths, spec, seed)).to_iter_dataset()
  ds = PackedBatchDataset(source, spec, packer=packer, window=10, bins=3)
  it = iter(ds)
  for _ in range(stop):
    next(it, None)
  state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
  rest = list(it)
  resumed = iter(ds)
  resumed.set_state(state)
  rest_resumed = list(resumed)
  assert len(rest) == len(rest_resumed)
  for a, b in zip(rest, rest_resumed):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_transfer_round_trip_keeps_every_field():
  spec = BatchSpec(batch_size=2, seq_len=16, max_images=4, patch_size=2, channels=3,
                   text_len=3)
  examples = make_examples([3, 1, 5], spec)
  examples[1]["notes"] = ("shrunk_to_fit",)
  examples.insert(2, skip_marker("corrupt", 7))
  transfer = to_transfer(examples)
  assert set(transfer) == {"patches", "rest"} and transfer["patches"].shape == (9, 12)
  for got, want in zip(from_transfer(transfer), examples, strict=True):
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  ragged = make_examples([2], spec) + make_examples([2], BatchSpec(1, 4, 1, 1, 1))
  shapes = [ex["patches"].shape for ex in from_transfer(to_transfer(ragged))]
  assert shapes == [(2, 12), (2, 1)]  # unequal widths travel whole, for the packer to refuse


@settings(max_examples=12, deadline=None)
@given(stop=st.integers(0, 12), group=st.integers(1, 7), seed=st.integers(0, 100))
def test_ungrouped_transfers_pack_and_resume_like_examples(stop, group, seed):
  """Examples sent in groups pack into the batches of the examples themselves, and a
  state taken anywhere (inside a group too) resumes them exactly."""
  spec = BatchSpec(batch_size=2, seq_len=24, max_images=4, patch_size=1, channels=2,
                   text_len=2)
  lengths = np.random.default_rng(seed).integers(1, 25, 60).tolist()
  examples = make_examples(lengths, spec, seed)
  groups = [to_transfer(examples[i:i + group]) for i in range(0, len(examples), group)]
  plain = list(PackedBatchDataset(grain.MapDataset.source(examples).to_iter_dataset(), spec,
                                  packer="first_fit", bins=2))
  ds = PackedBatchDataset(UngroupDataset(grain.MapDataset.source(groups).to_iter_dataset()),
                          spec, packer="first_fit", bins=2)
  it = iter(ds)
  head = [batch for _, batch in zip(range(stop), it)]
  state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
  rest = list(it)
  resumed = iter(ds)
  resumed.set_state(state)
  for got, want in ((head + rest, plain), (list(resumed), plain[len(head):])):
    assert len(got) == len(want)
    for a, b in zip(got, want):
      for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  foreign = {**state, "parent": state["parent"]["group"]}  # a state without the groups
  with pytest.raises(ValueError, match="not that of workers sending"):
    iter(ds).set_state(foreign)
