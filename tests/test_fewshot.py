"""Few-shot linear probes: ridge regression on frozen embeddings, l2 chosen on held-out
training images."""

import numpy as np
import pytest

from navit_clip.evaluate.fewshot import RidgeProbe, fewshot_accuracy, split_shots

NUM_CLASSES, DIM = 10, 32


def _clusters(rng, per_class: int, centres: np.ndarray, noise: float):
  labels = np.repeat(np.arange(NUM_CLASSES), per_class)
  return centres[labels] + noise * rng.normal(size=(len(labels), DIM)), labels


def test_separable_embeddings_are_classified_from_one_shot():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(NUM_CLASSES, DIM))
  train, test = _clusters(rng, 20, centres, 0.1), _clusters(rng, 30, centres, 0.1)
  out = fewshot_accuracy(*train, *test)
  for n in (1, 5, 10):
    assert out[f"{n}shot"] >= 0.98, out
    assert len(out[f"{n}shot_per_seed"]) == len(out[f"{n}shot_l2"]) == 3
  assert out["num_classes"] == NUM_CLASSES and out["chance"] == pytest.approx(0.1)


def test_random_embeddings_stay_at_chance():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(400, DIM)), rng.integers(0, NUM_CLASSES, 400)
  test = rng.normal(size=(3000, DIM)), rng.integers(0, NUM_CLASSES, 3000)
  out = fewshot_accuracy(*train, *test, num_classes=NUM_CLASSES)
  for n in (1, 5, 10):
    assert abs(out[f"{n}shot"] - 0.1) < 0.03, out


def test_ridge_probe_is_the_closed_form_solution_both_ways():
  rng = np.random.default_rng(2)
  for n in (8, 80):  # fewer and more points than features (D + 1 = 17)
    x, labels = rng.normal(size=(n, 16)), rng.integers(0, 3, n)
    probe = RidgeProbe(x, labels, 3)
    z = np.pad((x - x.mean(0)) / (x.std(0) + 1e-5), ((0, 0), (0, 1)), constant_values=100.0)
    y = 2.0 * (labels[:, None] == np.arange(3)) - 1.0
    w = np.linalg.solve(z.T @ z + 0.5 * np.eye(17), z.T @ y)
    queries = rng.normal(size=(50, 16))
    zq = np.pad((queries - x.mean(0)) / (x.std(0) + 1e-5), ((0, 0), (0, 1)),
                constant_values=100.0)
    np.testing.assert_array_equal(probe.predict(queries, 0.5), np.argmax(zq @ w, axis=1))


def test_shots_and_held_out_images_are_disjoint_and_nested_over_shots():
  labels = np.repeat(np.arange(4), 6)
  one, held_one = split_shots(labels, 4, 1, 2, np.random.default_rng(0))
  five, held_five = split_shots(labels, 4, 5, 2, np.random.default_rng(0))
  assert len(one) == 4 and len(held_one) == 8 and not set(one) & set(held_one)
  assert len(five) == 20 and len(held_five) == 4 and not set(five) & set(held_five)
  assert set(one) <= set(five)
  assert sorted(labels[five].tolist()) == sorted([0, 1, 2, 3] * 5)


def test_l2_is_chosen_without_the_test_split():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(NUM_CLASSES, DIM))
  train = _clusters(rng, 12, centres, 1.5)
  a = fewshot_accuracy(*train, *_clusters(rng, 5, centres, 1.5), shots=(5,))
  b = fewshot_accuracy(*train, *_clusters(rng, 5, centres, 0.1), shots=(5,))
  assert a["5shot_l2"] == b["5shot_l2"]
  assert b["5shot"] > a["5shot"]


def test_bad_inputs_name_what_is_wrong():
  x, labels = np.zeros((4, 3)), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match="labels must be integers"):
    fewshot_accuracy(x, labels, x, labels + 1, num_classes=2)
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    fewshot_accuracy(x[:, 0], labels, x, labels)
  with pytest.raises(ValueError, match="no training images are left"):
    fewshot_accuracy(x, labels, x, labels, shots=(2,))
  out = fewshot_accuracy(x, labels, x, labels, shots=(2,), l2_regs=(1.0,))
  assert out["2shot_l2"] == [1.0, 1.0, 1.0]
