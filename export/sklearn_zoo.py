"""scikit-learn models of the zoo, converted with skl2onnx (float32 tensors, no ZipMap).

Hyper-parameters come from a small grid scored on the validation split; the test split is only
used for the metrics in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import skl2onnx
import sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import Ridge
from sklearn.naive_bayes import BernoulliNB, GaussianNB, MultinomialNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler
from sklearn.svm import SVC, SVR
from sklearn.tree import DecisionTreeClassifier

from . import quality
from .data import Dataset, load, rows
from .spec import OPSET, BuildContext, Feeds, Tolerance, Trained

__all__ = ["convert", "TRAINERS"]

ML_OPSET = 3
#: tree ensembles compare float32 features with float32 thresholds in both libraries, but a row
#: lying on a threshold may still take the other branch; the issue allows 0.1% of such rows
TREE_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4, min_agreement=0.999)


def producer() -> dict[str, Any]:
    return {
        "exporter": "skl2onnx.to_onnx",
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
        "ai.onnx.ml": ML_OPSET,
    }


def _final(estimator: BaseEstimator) -> BaseEstimator:
    return estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator


def convert(
    estimator: BaseEstimator,
    input_name: str,
    n_features: int,
    path: Path,
    outputs: Sequence[tuple[str, int]] | None = None,
) -> None:
    """Convert a fitted estimator to ONNX with a dynamic batch axis; ``outputs`` renames a
    regressor's or transformer's single output to ``(name, width)``."""
    final_types = [(n, FloatTensorType([None, w])) for n, w in outputs] if outputs else None
    options = (
        {id(_final(estimator)): {"zipmap": False}}
        if isinstance(_final(estimator), ClassifierMixin)
        else None
    )
    model = skl2onnx.to_onnx(
        estimator,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        final_types=final_types,
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options=options,
    )
    # skl2onnx lists opset imports in set order, which varies between processes; sort them so
    # the same seed gives byte-identical files
    imports = sorted(model.opset_import, key=lambda o: o.domain)
    del model.opset_import[:]
    model.opset_import.extend(imports)
    path.write_bytes(model.SerializeToString())


def _select(
    make: Callable[..., BaseEstimator],
    grid: Sequence[dict[str, Any]],
    ds: Dataset,
    score: Callable[[np.ndarray, np.ndarray], float],
) -> tuple[BaseEstimator, dict[str, Any], float]:
    """Fit each configuration on train, keep the best validation score (higher is better)."""
    best: tuple[BaseEstimator, dict[str, Any], float] | None = None
    for params in grid:
        est = make(**params).fit(ds.x_train, ds.y_train)
        s = score(ds.y_val, est.predict(ds.x_val))
        if best is None or s > best[2]:
            best = (est, params, s)
    assert best is not None
    return best


def _input_name(ds: Dataset) -> str:
    return "pixels" if ds.name == "digits" else "features"


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(y == p))


def _neg_rmse(y: np.ndarray, p: np.ndarray) -> float:
    return -float(np.sqrt(np.mean((y - p) ** 2)))


def _trained(
    ds: Dataset,
    est: BaseEstimator,
    reference: Callable[[np.ndarray], list[np.ndarray]],
    evaluate: Callable[[Callable], dict[str, float]],
    headline: str,
    config: dict[str, Any],
    outputs: Sequence[tuple[str, int]] | None = None,
    tolerance: Tolerance | None = None,
    labels: list[str] | None = None,
) -> Trained:
    name = _input_name(ds)

    def ref(feeds: Feeds) -> list[np.ndarray]:
        return reference(feeds[name])

    return Trained(
        export=lambda p: convert(est, name, ds.n_features, p, outputs),
        reference=ref,
        feeds=lambda n: {name: rows(ds.x_test, n)},
        test_feeds={name: ds.x_test},
        calibration={name: ds.x_train},
        evaluate=evaluate,
        headline=headline,
        tolerance=tolerance or Tolerance(),
        labels=labels,
        preprocessing=ds.preprocessing,
        config={"estimator": repr(est), **config},
        producer=producer(),
    )


def _classifier(
    dataset: str,
    make: Callable[..., BaseEstimator],
    grid: Sequence[dict[str, Any]],
    ctx: BuildContext,
    tolerance: Tolerance | None = None,
) -> Trained:
    ds = load(dataset, ctx.seed)
    est, params, val = _select(make, grid, ds, _accuracy)
    name = _input_name(ds)

    def reference(x: np.ndarray) -> list[np.ndarray]:
        return [est.predict(x).astype(np.int64), est.predict_proba(x).astype(np.float32)]

    def evaluate(run: Callable) -> dict[str, float]:
        labels, _ = run({name: ds.x_test})
        return quality.classification(ds.y_test, labels)

    return _trained(
        ds,
        est,
        reference,
        evaluate,
        "accuracy",
        {"selected": params, "grid": list(grid), "val_accuracy": val},
        tolerance=tolerance,
        labels=ds.target_names,
    )


def _regressor(
    make: Callable[..., BaseEstimator],
    grid: Sequence[dict[str, Any]],
    ctx: BuildContext,
    tolerance: Tolerance | None = None,
) -> Trained:
    ds = load("diabetes", ctx.seed)
    est, params, val = _select(make, grid, ds, _neg_rmse)

    def reference(x: np.ndarray) -> list[np.ndarray]:
        return [est.predict(x).astype(np.float32).reshape(-1, 1)]

    def evaluate(run: Callable) -> dict[str, float]:
        return quality.regression(ds.y_test, run({"features": ds.x_test})[0])

    return _trained(
        ds,
        est,
        reference,
        evaluate,
        "rmse",
        {"selected": params, "grid": list(grid), "val_rmse": -val},
        outputs=[("prediction", 1)],
        tolerance=tolerance or Tolerance(atol=1e-3, rtol=1e-4),
    )


def diabetes_poly_ridge(ctx: BuildContext) -> Trained:
    def make(alpha: float) -> Pipeline:
        return make_pipeline(PolynomialFeatures(2), StandardScaler(), Ridge(alpha=alpha))

    return _regressor(make, [{"alpha": a} for a in (1.0, 10.0, 30.0, 100.0, 300.0)], ctx)


def diabetes_svr(ctx: BuildContext) -> Trained:
    def make(C: float, epsilon: float) -> Pipeline:
        return make_pipeline(StandardScaler(), SVR(C=C, epsilon=epsilon, gamma="scale"))

    grid = [{"C": c, "epsilon": e} for c in (10.0, 30.0, 100.0, 300.0) for e in (5.0, 20.0)]
    return _regressor(make, grid, ctx)


def diabetes_random_forest(ctx: BuildContext) -> Trained:
    def make(min_samples_leaf: int) -> RandomForestRegressor:
        return RandomForestRegressor(
            n_estimators=100,
            min_samples_leaf=min_samples_leaf,
            max_features=0.5,
            random_state=ctx.seed,
            n_jobs=1,
        )

    return _regressor(
        make,
        [{"min_samples_leaf": k} for k in (2, 5, 10)],
        ctx,
        tolerance=Tolerance(atol=1e-3, rtol=1e-4, min_agreement=0.999),
    )


def digits_svc(ctx: BuildContext) -> Trained:
    def make(C: float) -> SVC:
        return SVC(C=C, gamma="scale", probability=True, random_state=ctx.seed)

    return _classifier(
        "digits", make, [{"C": c} for c in (1.0, 10.0)], ctx, Tolerance(atol=1e-4, rtol=1e-3)
    )


def wine_decision_tree(ctx: BuildContext) -> Trained:
    def make(max_depth: int | None) -> DecisionTreeClassifier:
        return DecisionTreeClassifier(max_depth=max_depth, random_state=ctx.seed)

    return _classifier("wine", make, [{"max_depth": d} for d in (3, 5, None)], ctx, TREE_TOLERANCE)


def breast_cancer_random_forest(ctx: BuildContext) -> Trained:
    def make(min_samples_leaf: int) -> RandomForestClassifier:
        return RandomForestClassifier(
            n_estimators=100, min_samples_leaf=min_samples_leaf, random_state=ctx.seed, n_jobs=1
        )

    return _classifier(
        "breast-cancer", make, [{"min_samples_leaf": k} for k in (1, 3)], ctx, TREE_TOLERANCE
    )


def iris_knn(ctx: BuildContext) -> Trained:
    def make(n_neighbors: int) -> Pipeline:
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=n_neighbors))

    return _classifier(
        "iris",
        make,
        [{"n_neighbors": k} for k in (3, 5, 7, 9)],
        ctx,
        Tolerance(atol=1e-5, rtol=1e-4),
    )


def wine_gaussian_nb(ctx: BuildContext) -> Trained:
    return _classifier(
        "wine",
        GaussianNB,
        [{"var_smoothing": v} for v in (1e-9, 1e-6)],
        ctx,
        Tolerance(atol=1e-4, rtol=1e-3),
    )


def digits_multinomial_nb(ctx: BuildContext) -> Trained:
    return _classifier(
        "digits",
        MultinomialNB,
        [{"alpha": a} for a in (0.1, 1.0)],
        ctx,
        Tolerance(atol=1e-4, rtol=1e-3),
    )


def digits_bernoulli_nb(ctx: BuildContext) -> Trained:
    grid = [{"alpha": a, "binarize": 0.5} for a in (0.1, 1.0)]
    return _classifier("digits", BernoulliNB, grid, ctx, Tolerance(atol=1e-4, rtol=1e-3))


def digits_kmeans(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    est = KMeans(n_clusters=10, n_init=10, random_state=ctx.seed).fit(ds.x_train)
    train_clusters = est.predict(ds.x_train)

    def reference(x: np.ndarray) -> list[np.ndarray]:
        return [est.predict(x).astype(np.int64), est.transform(x).astype(np.float32)]

    def evaluate(run: Callable) -> dict[str, float]:
        clusters, distances = run({"pixels": ds.x_test})
        out = quality.clustering(ds.y_test, clusters, ds.y_train, train_clusters)
        out["mean_sq_distance"] = float(np.mean(distances.min(axis=1) ** 2))
        return out

    return _trained(
        ds,
        est,
        reference,
        evaluate,
        "adjusted_rand_index",
        {"n_clusters": 10, "n_init": 10},
        tolerance=Tolerance(atol=1e-4, rtol=1e-4, min_agreement=0.999),
    )


def digits_pca(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    k = 16
    est = PCA(n_components=k, random_state=ctx.seed).fit(ds.x_train)

    def reference(x: np.ndarray) -> list[np.ndarray]:
        return [est.transform(x).astype(np.float32)]

    def evaluate(run: Callable) -> dict[str, float]:
        (z,) = run({"pixels": ds.x_test})
        recon = est.inverse_transform(z.astype(np.float64))
        return {
            "reconstruction_mse": quality.reconstruction(ds.x_test, recon),
            "explained_variance": float(est.explained_variance_ratio_.sum()),
        }

    return _trained(
        ds,
        est,
        reference,
        evaluate,
        "explained_variance",
        {"n_components": k},
        outputs=[("embedding", k)],
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    )


TRAINERS: dict[str, Callable[[BuildContext], Trained]] = {
    "diabetes-poly-ridge": diabetes_poly_ridge,
    "diabetes-svr": diabetes_svr,
    "diabetes-random-forest": diabetes_random_forest,
    "digits-svc": digits_svc,
    "wine-decision-tree": wine_decision_tree,
    "breast-cancer-random-forest": breast_cancer_random_forest,
    "iris-knn": iris_knn,
    "wine-gaussian-nb": wine_gaussian_nb,
    "digits-multinomial-nb": digits_multinomial_nb,
    "digits-bernoulli-nb": digits_bernoulli_nb,
    "digits-kmeans": digits_kmeans,
    "digits-pca": digits_pca,
}
