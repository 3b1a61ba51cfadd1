"""The throughput window: run-wide rates from one process's batches, evaluation left out."""

import numpy as np
import pytest

from navit_clip.throughput import Throughput

KEYS = ["images_per_s", "tokens_per_s", "padding", "images_per_row", "data_wait_frac",
        "step_time", "mfu", "images_seen", "tokens_seen"]


class _Clock:
  """A clock the test moves by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def _batch(rows: int, images_per_row: int, real_per_row: int, seq_len: int = 10) -> dict:
  """A host batch of `rows` rows, each with `images_per_row` images in `real_per_row` tokens."""
  segment_ids = np.zeros((rows, seq_len), np.int32)
  segment_ids[:, :real_per_row] = 1
  image_mask = np.zeros((rows, 4), bool)
  image_mask[:, :images_per_row] = True
  return {"segment_ids": segment_ids, "image_mask": image_mask}


def test_report_gives_run_wide_rates_over_the_window_without_evaluation():
  clock = _Clock()
  # This process feeds 2 of the 8 rows of each global batch (4 processes).
  window = Throughput(global_rows=8, step_flops=1e9, peak_flops=1e12, clock=clock)
  clock.now += 0.5
  window.add(_batch(2, images_per_row=3, real_per_row=6), wait=0.25)
  clock.now += 1.0
  with window.paused():  # evaluation
    clock.now += 30.0
  clock.now += 0.5
  window.add(_batch(2, images_per_row=1, real_per_row=10), wait=0.25)
  clock.now += 2.0
  report = window.report()  # 4 s of training: 2 steps, 8 images, 32 of 40 tokens real
  assert list(report) == KEYS
  assert report == pytest.approx({
      "images_per_s": 8 * 4 / 4.0, "tokens_per_s": 32 * 4 / 4.0, "padding": 0.2,
      "images_per_row": 2.0, "data_wait_frac": 0.5 / 4.0, "step_time": 2.0,
      "mfu": 1e9 * 2 / 4.0 / 1e12, "images_seen": 8 * 4, "tokens_seen": 32 * 4})


def test_start_opens_an_empty_window():
  clock = _Clock()
  window = Throughput(global_rows=2, step_flops=1.0, peak_flops=1.0, clock=clock)
  window.add(_batch(2, images_per_row=4, real_per_row=10), wait=1.0)
  clock.now += 5.0
  window.report()
  window.start()
  window.add(_batch(2, images_per_row=1, real_per_row=5), wait=0.0)
  clock.now += 1.0
  report = window.report()
  assert report["images_per_s"] == 2.0 and report["step_time"] == 1.0
  assert report["padding"] == 0.5 and report["data_wait_frac"] == 0.0
  # The counts since the start run on across windows: 8 + 2 images, 20 + 10 real tokens.
  assert report["images_seen"] == 10.0 and report["tokens_seen"] == 30.0


def test_seen_counts_carry_on_from_the_ones_a_resumed_run_was_saved_with():
  clock = _Clock()
  first = Throughput(global_rows=4, step_flops=1.0, peak_flops=1.0, clock=clock)
  first.add(_batch(2, images_per_row=3, real_per_row=6), wait=0.0)  # 2 of 4 rows: x2
  saved = first.seen()
  assert saved == {"images_seen": 12.0, "tokens_seen": 24.0}
  resumed = Throughput(global_rows=4, step_flops=1.0, peak_flops=1.0, seen=saved,
                       clock=clock)
  resumed.add(_batch(2, images_per_row=1, real_per_row=5), wait=0.0)
  clock.now += 1.0
  report = resumed.report()
  assert (report["images_seen"], report["tokens_seen"]) == (12.0 + 4.0, 24.0 + 20.0)
  assert report["images_per_s"] == 4.0  # the rates are the window's own
