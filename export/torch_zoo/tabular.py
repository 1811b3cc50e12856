"""Tabular models: the diabetes regressors (linear, MLP) and the logistic-regression and MLP
classifiers of breast-cancer and digits."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import quality
from ..data import Dataset, load, rows
from ..spec import BuildContext, Tolerance, Trained
from ..torch_compress import (
    PruneConfig,
    prune_linear_chain,
)
from .classifiers import Classifier, pruned_details, student_mlp, train_classifier
from .common import (
    Standardize,
    export_module,
    fit,
    mlp,
    n_params,
    producer,
    seed_everything,
    torch_reference,
)


class TabularRegressor(nn.Module):
    """Standardise features, run a linear model or MLP, map back to the target's units."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, hidden: Sequence[int] = (), dropout: float = 0.0
    ):
        super().__init__()
        self.scale_in = Standardize(x.mean(0), x.std(0))
        self.body = mlp([x.shape[1], *hidden, 1], dropout)
        self.register_buffer("y_mean", torch.tensor(float(y.mean())))
        self.register_buffer("y_std", torch.tensor(float(y.std())))

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.scale_in(x))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.standardized(features) * self.y_std + self.y_mean


def _mse_std(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y_std = (y - model.y_mean) / model.y_std
    return F.mse_loss(model.standardized(x).squeeze(1), y_std)


def _regressor(ds: Dataset, hidden: Sequence[int], ctx: BuildContext, **train: Any) -> Trained:
    seed_everything(ctx.seed)
    model = TabularRegressor(ds.x_train, ds.y_train, hidden, dropout=0.1 if hidden else 0.0)
    history = fit(
        model, _mse_std, ds.x_train, ds.y_train, ds.x_val, ds.y_val, seed=ctx.seed, **train
    )
    names = ["features"], ["prediction"]
    reference = torch_reference(model, names[0])
    example = [torch.from_numpy(ds.x_test[:4])]
    variants: dict[str, Callable[[Path], dict[str, Any]]] = {}
    not_applicable = {
        "distilled": "distillation here trains on a classifier's softened class probabilities"
    }
    if hidden:
        config = PruneConfig(epochs=60, lr=1e-3)

        def pruned(path: Path) -> dict:
            seed_everything(ctx.seed)
            student = copy.deepcopy(model)
            student.body, info = prune_linear_chain(model.body, config)
            tuned = fit(
                student,
                _mse_std,
                ds.x_train,
                ds.y_train,
                ds.x_val,
                ds.y_val,
                epochs=config.epochs,
                lr=config.lr,
                seed=ctx.seed,
            )
            export_module(student, example, *names, path)
            return pruned_details(model, student, info, config, tuned)

        variants["pruned"] = pruned
    else:
        not_applicable["pruned"] = "a single linear layer has no hidden neurons to remove"
    return Trained(
        export=lambda p: export_module(model, example, *names, p),
        reference=reference,
        feeds=lambda n: {"features": rows(ds.x_test, n)},
        test_feeds={"features": ds.x_test},
        calibration={"features": ds.x_train},
        variants=variants,
        not_applicable=not_applicable,
        evaluate=lambda run: quality.regression(ds.y_test, run({"features": ds.x_test})[0]),
        headline="rmse",
        tolerance=Tolerance(atol=1e-3, rtol=1e-5),
        preprocessing=ds.preprocessing,
        config={
            "architecture": f"standardise -> {' -> '.join(map(str, [ds.n_features, *hidden, 1]))}",
            "parameters": n_params(model),
            **history,
        },
        producer=producer(),
    )


_LINEAR_NOT_APPLICABLE = {
    "pruned": "a single linear layer has no hidden neurons to remove",
    "distilled": "a single linear layer: there is no smaller student to distill into",
}


def diabetes_linear(ctx: BuildContext) -> Trained:
    return _regressor(load("diabetes", ctx.seed), (), ctx, epochs=200, lr=1e-2)


def diabetes_mlp(ctx: BuildContext) -> Trained:
    return _regressor(
        load("diabetes", ctx.seed), (32, 16), ctx, epochs=200, lr=3e-3, weight_decay=1e-3
    )


def breast_cancer_logreg(ctx: BuildContext) -> Trained:
    ds = load("breast-cancer", ctx.seed)
    seed_everything(ctx.seed)
    model = Classifier(
        nn.Linear(ds.n_features, 1),
        binary=True,
        scale=Standardize(ds.x_train.mean(0), ds.x_train.std(0)),
    )
    trained = train_classifier(
        ds,
        model,
        ctx,
        epochs=150,
        lr=1e-2,
        weight_decay=1e-3,
        not_applicable=_LINEAR_NOT_APPLICABLE,
    )
    trained.config["architecture"] = "standardise -> linear(30, 1) -> sigmoid"
    return trained


def digits_logreg(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    seed_everything(ctx.seed)
    model = Classifier(nn.Linear(64, 10))
    trained = train_classifier(
        ds,
        model,
        ctx,
        epochs=150,
        lr=1e-2,
        weight_decay=1e-4,
        not_applicable=_LINEAR_NOT_APPLICABLE,
    )
    trained.config["architecture"] = "linear(64, 10) -> softmax"
    return trained


def digits_mlp(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    seed_everything(ctx.seed)
    model = Classifier(mlp([64, 256, 128, 10], dropout=0.2))
    trained = train_classifier(
        ds,
        model,
        ctx,
        prune=prune_linear_chain,
        prune_config=PruneConfig(keep_ratio=0.25, epochs=30, lr=1e-3),
        student=student_mlp,
        epochs=100,
        lr=2e-3,
        weight_decay=1e-4,
    )
    trained.config["architecture"] = "64 -> 256 -> 128 -> 10, ReLU, dropout 0.2"
    return trained
