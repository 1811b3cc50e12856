from __future__ import annotations

import numpy as np
import pytest

from export import quality


def test_classification_metrics() -> None:
    m = quality.classification(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_regression_metrics() -> None:
    m = quality.regression(np.array([1.0, 2.0, 3.0]), np.array([[1.0], [2.0], [5.0]]))
    assert m["rmse"] == pytest.approx(np.sqrt(4 / 3))
    assert m["mae"] == pytest.approx(2 / 3)


def test_clustering_purity_maps_clusters_by_training_majority() -> None:
    train_y, train_c = np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])
    m = quality.clustering(np.array([0, 1, 1]), np.array([5, 7, 5]), train_y, train_c)
    assert m["purity"] == pytest.approx(2 / 3)


def test_generated_digits_proxy_uses_the_judge() -> None:
    def judge(feeds):
        n = len(feeds["pixels"])
        probs = np.full((n, 10), 0.0, np.float32)
        probs[np.arange(n), np.arange(n) % 10] = 0.95  # confident, every class equally often
        probs[np.arange(n), (np.arange(n) + 1) % 10] = 0.05
        return [probs.argmax(1), probs]

    images = np.zeros((20, 64), np.float32)
    m = quality.generated_digits(images, judge, requested=np.arange(20) % 10)
    assert m["confident_share"] == 1.0
    assert m["class_entropy_bits"] == pytest.approx(np.log2(10))
    assert m["classes_covered"] == 10
    assert m["label_agreement"] == 1.0
