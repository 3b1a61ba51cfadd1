"""Validation metrics of classification models against hand-computed references."""

import math

import numpy as np
import pytest

from navit_clip.evaluate.classification import (average_precision, classification_metrics,
                                                multilabel_metrics, softmax_metrics)


def test_softmax_top1_top5_and_loss():
  logits = np.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
  out = softmax_metrics(logits, np.array([1, 1]))
  # p(label) = 3/4 and 1/4; top-5 of two classes holds every label.
  assert out == {"top1": 0.5, "top5": 1.0, "num_images": 2,
                 "loss": pytest.approx((math.log(4 / 3) + math.log(4)) / 2)}
  six = np.array([[6.0, 5, 4, 3, 2, 1]] * 3)
  out = softmax_metrics(six, np.array([0, 4, 5]))
  assert out["top1"] == pytest.approx(1 / 3) and out["top5"] == pytest.approx(2 / 3)


def test_multilabel_precision_at_1_and_map():
  logits = np.array([[3.0, 1, 2], [0, 2, 1], [1, 0, 3], [2, 3, 0]])
  labels = np.array([[1.0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
  out = multilabel_metrics(logits, labels)
  # Top class a label only for image 0.
  assert out["prec1"] == 0.25
  # Class 0 ranks its positives 1st and 2nd (AP 1); class 1 its only positive 4th (1/4);
  # class 2 its positives 2nd and 3rd ((1/2 + 2/3) / 2).
  assert out["map"] == pytest.approx((1 + 0.25 + (0.5 + 2 / 3) / 2) / 3)
  assert out["map_classes"] == 3 and out["num_images"] == 4
  p = 1 / (1 + np.exp(-logits))
  reference = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum(axis=1).mean()
  assert out["loss"] == pytest.approx(reference)


def test_map_skips_classes_without_positives_and_ap_breaks_ties_by_index():
  logits = np.array([[1.0, 5.0], [2.0, 5.0]])
  labels = np.array([[1.0, 0.0], [0.0, 0.0]])
  out = multilabel_metrics(logits, labels)
  assert out["map_classes"] == 1 and out["map"] == 0.5  # its positive ranks 2nd
  assert average_precision(np.array([1.0, 1.0]), np.array([False, True])) == 0.5
  assert average_precision(np.array([1.0, 1.0]), np.array([True, False])) == 1.0


def test_dispatch_and_bad_inputs():
  logits = np.array([[0.0, 1.0]])
  assert classification_metrics(logits, np.array([1]), multi_label=False)["top1"] == 1.0
  assert classification_metrics(logits, np.array([[0.0, 1.0]]), multi_label=True)["prec1"] == 1.0
  with pytest.raises(ValueError, match=r"in \[0, 2\)"):
    softmax_metrics(logits, np.array([2]))
  with pytest.raises(ValueError, match="multi-hot"):
    multilabel_metrics(logits, np.array([1]))
