from __future__ import annotations

import numpy as np
import pytest

from export.data import DATASETS, load


@pytest.mark.parametrize("name", DATASETS)
def test_splits_are_disjoint_complete_and_sized(name: str) -> None:
    ds = load(name)
    n = ds.record["n_samples"]
    sizes = ds.record["split"]["sizes"]
    assert sizes["train"] + sizes["validation"] + sizes["test"] == n
    assert len(ds.x_test) == sizes["test"] == pytest.approx(0.2 * n, abs=1)
    assert len(ds.x_val) == pytest.approx(0.2 * n, abs=2)
    rows = np.concatenate([ds.x_train, ds.x_val, ds.x_test])
    assert len(np.unique(rows, axis=0)) == len(np.unique(np.asarray(rows), axis=0))
    assert ds.x_train.dtype == np.float32
    assert ds.record["split"]["seed"] == 0


def test_split_is_deterministic_and_seeded() -> None:
    a, b = load("wine", 0), load("wine", 0)
    c = load("wine", 1)
    assert np.array_equal(a.x_test, b.x_test)
    assert a.record["split"]["test_indices_sha256"] == b.record["split"]["test_indices_sha256"]
    assert a.record["split"]["test_indices_sha256"] != c.record["split"]["test_indices_sha256"]


def test_classification_splits_are_stratified() -> None:
    ds = load("digits")
    assert ds.record["split"]["stratified"] is True
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 360 test digits, ~36 per class


def test_digits_are_scaled_to_unit_range() -> None:
    ds = load("digits")
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.preprocessing["scale"] == pytest.approx(1 / 16)
    assert ds.target_names == [str(i) for i in range(10)]


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match=r"dataset 'mnist' is unknown"):
        load("mnist")
