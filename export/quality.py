"""Test-split quality metrics, computed on what the ONNX model outputs (what users get served)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from .spec import Runner

__all__ = [
    "CONFIDENT",
    "classification",
    "regression",
    "reconstruction",
    "clustering",
    "generated_digits",
]

#: a generated digit counts as recognisable when the digits CNN gives its top class this probability
CONFIDENT = 0.9


def classification(y_true: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(skm.accuracy_score(y_true, labels)),
        "macro_f1": float(skm.f1_score(y_true, labels, average="macro")),
    }


def regression(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    return {
        "rmse": float(np.sqrt(skm.mean_squared_error(y_true, pred))),
        "r2": float(skm.r2_score(y_true, pred)),
        "mae": float(skm.mean_absolute_error(y_true, pred)),
    }


def reconstruction(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean squared error per pixel, on the [0, 1] scale."""
    return float(np.mean((np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)) ** 2))


def clustering(
    y_true: np.ndarray, clusters: np.ndarray, train_y: np.ndarray, train_clusters: np.ndarray
) -> dict[str, float]:
    """Agreement of clusters with the true classes; purity maps each cluster to its majority
    class on the training split, then scores that mapping on the test split."""
    mapping = {}
    for c in np.unique(train_clusters):
        values, counts = np.unique(train_y[train_clusters == c], return_counts=True)
        mapping[int(c)] = int(values[np.argmax(counts)])
    mapped = np.array([mapping.get(int(c), -1) for c in clusters])
    return {
        "adjusted_rand_index": float(skm.adjusted_rand_score(y_true, clusters)),
        "normalized_mutual_info": float(skm.normalized_mutual_info_score(y_true, clusters)),
        "purity": float(np.mean(mapped == y_true)),
    }


def generated_digits(
    images: np.ndarray, judge: Runner, requested: np.ndarray | None = None
) -> dict[str, float]:
    """Proxy quality of generated 8x8 digits, judged by the digits CNN.

    ``confident_share``: share the CNN classifies with top probability >= 0.9 (recognisable);
    ``class_entropy_bits``: entropy of the predicted class histogram (log2(10) = 3.32 when every
    digit is generated equally often: no mode collapse); ``label_agreement``: for a conditional
    generator, share classified as the digit that was asked for.
    """
    pixels = np.clip(np.asarray(images, np.float32).reshape(-1, 1, 8, 8), 0.0, 1.0)
    _, probabilities = judge({"pixels": pixels})
    top = probabilities.max(axis=1)
    predicted = probabilities.argmax(axis=1)
    hist = np.bincount(predicted, minlength=probabilities.shape[1]) / len(predicted)
    nonzero = hist[hist > 0]
    out = {
        "confident_share": float(np.mean(top >= CONFIDENT)),
        "class_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
        "classes_covered": float(np.count_nonzero(hist)),
    }
    if requested is not None:
        out["label_agreement"] = float(np.mean(predicted == requested))
    return out
