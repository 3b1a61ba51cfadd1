"""Few-shot linear probes: closed-form ridge regression on frozen image embeddings.

For n shots and one seed, n images of each class are drawn from the training split of a
labelled source. Their embeddings are standardised (per-feature mean and std of those
shots), a constant feature BIAS_FEATURE is appended (so the bias is all but unregularised),
and a linear map onto one-vs-rest targets in {-1, +1} is solved in closed form:

    W = (X^T X + l2 I)^-1 X^T Y     (N >= D)      W = X^T (X X^T + l2 I)^-1 Y     (N < D)

with one eigendecomposition shared by every l2. The l2 is chosen among `l2_regs` by top-1
on held-out training images (the next `holdout_per_class` images of each class after its
shots; never a test image), and the probe with that l2 is scored on the test split: top-1
of the argmax over classes. NaViT reports ImageNet 10-shot this way. The `fewshot`
evaluator (navit_clip.evaluate.runner) probes a model's image embeddings (`embed_images`:
a contrastive model's, or a classification model's before its head) with this.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BIAS_FEATURE = 100.0  # the constant feature appended for the bias
DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_L2 = tuple(2.0 ** k for k in range(-6, 15, 2))
_MIN_STD = 1e-5  # added to each feature's std before dividing


class RidgeProbe:
  """Ridge regressions of standardised embeddings x [N, D] onto +-1 targets of int labels
  [N] in [0, num_classes), for any l2 at the cost of one matrix product."""

  def __init__(self, x: np.ndarray, labels: np.ndarray, num_classes: int):
    x = np.asarray(x, np.float64)
    self.mean = x.mean(axis=0)
    self.std = x.std(axis=0) + _MIN_STD
    x = self._features(x)
    y = 2.0 * (labels[:, None] == np.arange(num_classes)) - 1.0  # [N, C]
    if x.shape[0] >= x.shape[1]:
      self.eigs, q = np.linalg.eigh(x.T @ x)
      self.lhs, self.rhs = q, q.T @ (x.T @ y)
    else:
      self.eigs, q = np.linalg.eigh(x @ x.T)
      self.lhs, self.rhs = x.T @ q, q.T @ y

  def _features(self, x: np.ndarray) -> np.ndarray:
    x = (np.asarray(x, np.float64) - self.mean) / self.std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)

  def predict(self, x: np.ndarray, l2: float) -> np.ndarray:
    """int64 [N]: the class of each row of embeddings x [N, D] under the probe with `l2`."""
    weights = (self.lhs / (self.eigs + l2)) @ self.rhs  # [D + 1, C]
    return np.argmax(self._features(x) @ weights, axis=1)


def split_shots(labels: np.ndarray, num_classes: int, shots: int, holdout_per_class: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(shot indices, held-out indices) into `labels`: per class, a random permutation's
  first `shots` and the `holdout_per_class` after them (fewer where the class is small)."""
  shot_idx, holdout_idx = [], []
  for c in range(num_classes):
    order = rng.permutation(np.flatnonzero(labels == c))
    shot_idx.append(order[:shots])
    holdout_idx.append(order[shots:shots + holdout_per_class])
  return np.concatenate(shot_idx), np.concatenate(holdout_idx)


def _check(name: str, embeddings: np.ndarray, labels: np.ndarray,
           num_classes: int) -> None:
  if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],) or not len(labels):
    raise ValueError(f"fewshot {name}: embeddings must be [N, D] with labels [N], N >= 1; "
                     f"got {list(embeddings.shape)} and {list(labels.shape)}")
  if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"fewshot {name}: labels must be integers in [0, {num_classes})")


def probe_once(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
               num_classes: int, shots: int, rng: np.random.Generator,
               l2_regs: Sequence[float], holdout_per_class: int) -> tuple[float, float]:
  """(test top-1, chosen l2) of one probe on `shots` per class of train (embeddings,
  labels); l2 chosen on held-out training images when there is more than one."""
  (x, y), (x_test, y_test) = train, test
  shot_idx, holdout_idx = split_shots(y, num_classes, shots, holdout_per_class, rng)
  probe = RidgeProbe(x[shot_idx], y[shot_idx], num_classes)
  l2 = l2_regs[0]
  if len(l2_regs) > 1:
    if not len(holdout_idx):
      raise ValueError(f"fewshot: no training images are left after {shots} shots per "
                       "class to choose the l2 on; give one l2 or more training images")
    held = [np.mean(probe.predict(x[holdout_idx], r) == y[holdout_idx]) for r in l2_regs]
    l2 = l2_regs[int(np.argmax(held))]
  return float(np.mean(probe.predict(x_test, l2) == y_test)), float(l2)


def fewshot_accuracy(train_embeddings: np.ndarray, train_labels: np.ndarray,
                     test_embeddings: np.ndarray, test_labels: np.ndarray, *,
                     num_classes: int | None = None,
                     shots: Sequence[int] = DEFAULT_SHOTS,
                     seeds: Sequence[int] = DEFAULT_SEEDS,
                     l2_regs: Sequence[float] = DEFAULT_L2,
                     holdout_per_class: int = 2) -> dict[str, float | list[float]]:
  """Few-shot linear-probe top-1 for each number of shots, over seeds.

  Args:
    train_embeddings / train_labels: float [N, D] and int [N]: the shots' pool.
    test_embeddings / test_labels: float [N', D] and int [N']: what is scored.
    num_classes: C (default: 1 + the largest label of either split).
    shots: images per class (a class with fewer contributes all of its images).
    seeds: one draw of shots (and held-out images) per seed.
    l2_regs: the ridge strengths to choose from (one: no choice, no held-out images).
    holdout_per_class: held-out training images per class for the choice of l2.

  Returns:
    {"{n}shot": mean test top-1 over seeds, "{n}shot_per_seed": [top-1 per seed],
     "{n}shot_l2": [chosen l2 per seed] for each n of `shots`, "num_classes": C,
     "chance": 1 / C}.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  _check("train", np.asarray(train_embeddings), train_labels, num_classes)
  _check("test", np.asarray(test_embeddings), test_labels, num_classes)
  if not (l2_regs and shots and seeds) or min(l2_regs) <= 0 or min(shots) < 1:
    raise ValueError(f"fewshot needs shots >= 1, l2 values > 0 and a seed; got shots "
                     f"{list(shots)}, l2_regs {list(l2_regs)}, seeds {list(seeds)}")
  train = (np.asarray(train_embeddings), train_labels)
  test = (np.asarray(test_embeddings), test_labels)
  out: dict[str, float | list[float]] = {}
  for n in shots:
    runs = [probe_once(train, test, num_classes, n, np.random.default_rng(seed), l2_regs,
                       holdout_per_class) for seed in seeds]
    out[f"{n}shot"] = float(np.mean([acc for acc, _ in runs]))
    out[f"{n}shot_per_seed"] = [acc for acc, _ in runs]
    out[f"{n}shot_l2"] = [l2 for _, l2 in runs]
  out.update(num_classes=num_classes, chance=1.0 / num_classes)
  return out


def alternate_split(embedded: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """(pool, test) of one labelled set: its even and its odd positions.

  `embedded` holds arrays [N, ...] in example-id order (`embed_packed`'s output); taking
  every other image, not the first half, keeps every class on both sides of a set stored
  class by class (class folders).
  """
  return ({k: v[0::2] for k, v in embedded.items()},
          {k: v[1::2] for k, v in embedded.items()})
