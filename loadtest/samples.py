"""The rows the load generators send: the test splits of the zoo's datasets, in one small file.

``loadtest/samples.npz`` holds, for each dataset of ``export.data`` (digits, diabetes,
breast-cancer, iris, wine), its seeded test split as float32 after the documented preprocessing:
the rows the zoo models were evaluated on, so digits models get digit images and tabular models
get real feature rows. The Locust scenarios and the serving benchmark read it with numpy alone,
so a load generator needs neither scikit-learn nor the export package.
``python -m loadtest.samples`` rewrites it from ``export.data`` (needed only when the splits
change; tests/e2e/test_locust_smoke.py checks that they have not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["SAMPLES", "current_splits", "load", "write"]

SAMPLES = Path(__file__).resolve().with_name("samples.npz")


def load(path: Path = SAMPLES) -> dict[str, np.ndarray]:
    """Dataset name -> its test split, ``(rows, features)`` float32."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def current_splits() -> dict[str, np.ndarray]:
    """The test splits as ``export.data`` makes them now (needs scikit-learn)."""
    from export.data import DATASETS
    from export.data import load as load_dataset

    return {name: load_dataset(name).x_test for name in DATASETS}


def write(path: Path = SAMPLES) -> None:
    np.savez_compressed(path, allow_pickle=False, **current_splits())


if __name__ == "__main__":
    write()
    print(f"wrote {SAMPLES}: " + ", ".join(f"{k} {v.shape}" for k, v in load().items()))
