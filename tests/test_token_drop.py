"""Token dropping: kept tokens, and the distribution of the per-image rate."""

from hypothesis import given, strategies as st
import numpy as np
import pytest

from navit_clip.config import default_config
from navit_clip.data.token_drop import TokenDropper, drop_tokens, schedule_value


@given(n=st.integers(1, 300), rate=st.floats(0, 0.99), seed=st.integers(0, 2**31))
def test_kept_tokens_are_sorted_aligned_and_at_least_one(n, rate, seed):
  rng = np.random.default_rng(seed)
  patches = rng.integers(0, 256, (n, 12), np.uint8)
  positions = np.stack(np.divmod(np.arange(n, dtype=np.int32), 7), -1)
  kept_p, kept_pos, kept = drop_tokens(rng, patches, positions, rate)
  assert 1 <= len(kept) <= n
  assert abs(len(kept) - n * (1 - rate)) < 1 or len(kept) == 1
  assert np.all(np.diff(kept) > 0)
  np.testing.assert_array_equal(kept_p, patches[kept])
  np.testing.assert_array_equal(kept_pos, positions[kept])


def test_kept_fraction_is_unbiased():
  rng = np.random.default_rng(0)
  patches, positions = np.zeros((7, 3), np.uint8), np.zeros((7, 2), np.int32)
  kept = [len(drop_tokens(rng, patches, positions, 0.5)[2]) for _ in range(4000)]
  assert abs(np.mean(kept) - 3.5) < 0.05  # stochastic rounding of 7 * 0.5


def test_constant_rate_over_many_images():
  dropper = TokenDropper(kind="constant", rate=0.25)
  rng = np.random.default_rng(1)
  fractions = []
  for n in rng.integers(16, 300, 500):
    kept, _ = dropper(rng, np.zeros((n, 4), np.uint8), np.zeros((n, 2), np.int32))
    fractions.append(len(kept) / n)
  assert abs(np.mean(fractions) - 0.75) < 0.01


def test_beta_rate_mean_and_variance():
  dropper = TokenDropper(kind="beta", rate=0.4, max_rate=0.8)
  rng = np.random.default_rng(2)
  d = np.array([dropper.sample_rate(rng, 100) for _ in range(20_000)])
  u = d / 0.8
  assert d.min() >= 0 and d.max() < 0.8
  assert abs(d.mean() - 0.4) < 0.01
  assert abs(u.var() - 0.3 * 0.5 * 0.5) < 0.005


def test_resolution_rate_rises_with_length():
  dropper = TokenDropper(kind="resolution", min_rate=0.1, max_rate=0.7, min_tokens=16,
                         max_tokens=256)
  rng = np.random.default_rng(3)
  means = []
  for n, mu in ((16, 0.1), (136, 0.4), (256, 0.7), (1000, 0.7)):
    d = np.array([dropper.sample_rate(rng, n) for _ in range(3000)])
    assert np.all(np.abs(d - mu) <= 2 * 0.02 + 1e-9)  # beyond 2 sigma is rejected
    assert abs(d.mean() - mu) < 0.003
    means.append(d.mean())
  assert means[0] < means[1] < means[2]


def test_schedule_moves_from_start_to_end():
  assert schedule_value(0, 0.8, 0.2, 1000) == pytest.approx(0.8)
  assert schedule_value(500, 0.8, 0.2, 1000) == pytest.approx(0.5)
  assert schedule_value(5000, 0.8, 0.2, 1000) == pytest.approx(0.2)
  values = [schedule_value(t, 0.2, 0.8, 1000) for t in range(0, 1001, 50)]
  assert np.all(np.diff(values) > 0)
  dropper = TokenDropper(kind="constant", schedule=True, schedule_start=0.8,
                         schedule_end=0.2, schedule_images=100)
  assert dropper.sample_rate(np.random.default_rng(0), 50, images_seen=100) == (
      pytest.approx(0.2))


def test_none_keeps_everything_and_config_round_trip():
  cfg = default_config().data.token_drop
  dropper = TokenDropper.from_config(cfg)
  patches = np.arange(20, dtype=np.uint8).reshape(10, 2)
  kept, _ = dropper(np.random.default_rng(0), patches, np.zeros((10, 2), np.int32))
  assert kept is patches


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="sometimes"), "token drop kind"),
    (dict(kind="constant", rate=1.0), "rate"),
    (dict(kind="beta", rate=0.9, max_rate=0.5), "mean rate"),
    (dict(kind="resolution", schedule=True), "schedule"),
    (dict(kind="resolution", min_tokens=64, max_tokens=64), "min_tokens"),
])
def test_bad_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TokenDropper(**kwargs)
