"""The datasets that ship inside scikit-learn, with fixed, seeded train / validation / test splits.

Nothing is downloaded: ``load_digits``, ``load_diabetes``, ``load_breast_cancer``, ``load_iris``
and ``load_wine`` read files bundled with scikit-learn. The split (fractions, seed, sizes and a
hash of the test indices) is recorded in every manifest so a client can rebuild it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split

__all__ = ["DEFAULT_SEED", "SPLIT", "Dataset", "DATASETS", "load", "rows"]

DEFAULT_SEED = 0
#: train / validation / test fractions, identical for every dataset
SPLIT = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Dataset:
    """Features as float32 (after the documented preprocessing) and targets, already split."""

    name: str
    task: str  # "classification" or "regression"
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    target_names: list[str] | None
    preprocessing: dict[str, Any]
    seed: int
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.target_names or [])


_LOADERS = {
    "digits": (skd.load_digits, "classification"),
    "diabetes": (skd.load_diabetes, "regression"),
    "breast-cancer": (skd.load_breast_cancer, "classification"),
    "iris": (skd.load_iris, "classification"),
    "wine": (skd.load_wine, "classification"),
}
DATASETS = tuple(_LOADERS)

_PREPROCESSING: dict[str, dict[str, Any]] = {
    "digits": {
        "description": "8x8 grey-level digit images, pixel values 0..16 divided by 16 to [0, 1], "
        "flattened row-major to 64 features (or shaped [1, 8, 8] for image models)",
        "scale": 1.0 / 16.0,
        "offset": 0.0,
        "range": [0.0, 1.0],
        "image_shape": [8, 8],
    },
}
_RAW: dict[str, Any] = {
    "description": "raw features as scikit-learn ships them, in its column order; any "
    "standardisation is part of the model graph",
    "scale": 1.0,
    "offset": 0.0,
}


@cache
def load(name: str, seed: int = DEFAULT_SEED) -> Dataset:
    """Load ``name`` and split it 60/20/20 with ``seed`` (stratified for classification)."""
    try:
        loader, task = _LOADERS[name]
    except KeyError:
        raise ValueError(f"dataset {name!r} is unknown; expected one of {list(DATASETS)}") from None
    bunch = loader()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    prep = _PREPROCESSING.get(name, _RAW)
    x = (x * float(prep["scale"]) + float(prep["offset"])).astype(np.float32)
    y = y.astype(np.int64) if task == "classification" else y.astype(np.float32)

    index = np.arange(len(x))
    stratify = y if task == "classification" else None
    _, test_frac = SPLIT[1], SPLIT[2]
    idx_rest, idx_test = train_test_split(
        index, test_size=test_frac, random_state=seed, stratify=stratify
    )
    val_of_rest = SPLIT[1] / (SPLIT[0] + SPLIT[1])
    idx_train, idx_val = train_test_split(
        idx_rest,
        test_size=val_of_rest,
        random_state=seed,
        stratify=None if stratify is None else y[idx_rest],
    )
    target_names = [str(t) for t in bunch.target_names] if task == "classification" else None
    feature_names = [str(f) for f in getattr(bunch, "feature_names", [])] or [
        f"x{i}" for i in range(x.shape[1])
    ]
    record = {
        "name": name,
        "source": f"sklearn.datasets.{loader.__name__}",
        "n_samples": int(len(x)),
        "n_features": int(x.shape[1]),
        "split": {
            "fractions": {"train": SPLIT[0], "validation": SPLIT[1], "test": SPLIT[2]},
            "stratified": stratify is not None,
            "seed": seed,
            "method": "sklearn.model_selection.train_test_split: test first, then validation",
            "sizes": {"train": len(idx_train), "validation": len(idx_val), "test": len(idx_test)},
            "test_indices_sha256": hashlib.sha256(
                np.sort(idx_test).astype(np.int64).tobytes()
            ).hexdigest(),
        },
    }
    return Dataset(
        name=name,
        task=task,
        x_train=x[idx_train],
        y_train=y[idx_train],
        x_val=x[idx_val],
        y_val=y[idx_val],
        x_test=x[idx_test],
        y_test=y[idx_test],
        feature_names=feature_names,
        target_names=target_names,
        preprocessing=dict(prep),
        seed=seed,
        record=record,
    )


def rows(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of ``x``, cycling when it has fewer (feeds of any size for parity checks)."""
    return np.take(x, np.arange(n) % len(x), axis=0)
