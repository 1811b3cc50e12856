"""The classification recipe shared by the tabular classifiers and the CNN: a body wrapped to
answer ``(label, probabilities)``, trained, then pruned and distilled into their variants."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import quality
from ..data import Dataset, rows
from ..spec import BuildContext, Tolerance, Trained
from ..torch_compress import (
    DistillConfig,
    PruneConfig,
    distillation_loss,
)
from .common import export_module, fit, mlp, n_params, producer, seed_everything, torch_reference


class Classifier(nn.Module):
    """A network that gives logits, served as ``(label, probabilities)``.

    With ``binary=True`` the body gives one logit and the probabilities are ``[1 - p, p]``:
    binary logistic regression.
    """

    def __init__(self, body: nn.Module, binary: bool = False, scale: nn.Module | None = None):
        super().__init__()
        self.scale_in = scale or nn.Identity()
        self.body = body
        self.binary = binary

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.scale_in(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.logits(x)
        if self.binary:
            p = torch.sigmoid(z)
            probabilities = torch.cat([1.0 - p, p], dim=1)
        else:
            probabilities = torch.softmax(z, dim=1)
        return torch.argmax(probabilities, dim=1), probabilities


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = model.logits(x)
    if getattr(model, "binary", False):
        return F.binary_cross_entropy_with_logits(z.squeeze(1), y.float())
    return F.cross_entropy(z, y)


def pruned_details(
    teacher: nn.Module, pruned: nn.Module, info: dict, config: PruneConfig, tuned: dict
) -> dict[str, Any]:
    before, after = n_params(teacher), n_params(pruned)
    return {
        "technique": "structured pruning (whole neurons / channels removed, dependency-aware), "
        "then fine-tuning",
        **info,
        **config.to_dict(),
        "parameters_before": before,
        "parameters_after": after,
        "parameters_removed": f"{1.0 - after / before:.0%}",
        "fine_tune": tuned,
    }


def train_classifier(
    ds: Dataset,
    model: Classifier,
    ctx: BuildContext,
    input_shape: Sequence[int] = (),
    augment: Callable | None = None,
    prune: Callable[[nn.Module, PruneConfig], tuple[nn.Module, dict]] | None = None,
    prune_config: PruneConfig | None = None,
    student: Callable[[], nn.Module] | None = None,
    distill_config: DistillConfig | None = None,
    not_applicable: dict[str, str] | None = None,
    **train: Any,
) -> Trained:
    shape = (-1, *input_shape) if input_shape else (-1, ds.n_features)
    x_train, x_val, x_test = (a.reshape(shape) for a in (ds.x_train, ds.x_val, ds.x_test))
    history = fit(
        model,
        _cross_entropy,
        x_train,
        ds.y_train,
        x_val,
        ds.y_val,
        augment=augment,
        seed=ctx.seed,
        **train,
    )
    input_name = "pixels" if ds.name == "digits" else "features"
    names = [input_name], ["label", "probabilities"]

    def evaluate(run: Callable) -> dict[str, float]:
        labels, _ = run({input_name: x_test})
        return quality.classification(ds.y_test, labels)

    example = [torch.from_numpy(x_test[:4])]
    data = (x_train, ds.y_train, x_val, ds.y_val)
    recipe = _Recipe(model, data, example, names, augment, ctx.seed)
    variants: dict[str, Callable[[Path], dict[str, Any]]] = {}
    if prune is not None:
        pcfg = prune_config or PruneConfig()
        variants["pruned"] = recipe.pruned(prune, pcfg, train.get("weight_decay", 0.0))
    if student is not None:
        variants["distilled"] = recipe.distilled(student, distill_config or DistillConfig())
    return Trained(
        export=lambda p: export_module(model, example, *names, p),
        reference=torch_reference(model, names[0]),
        feeds=lambda n: {input_name: rows(x_test, n)},
        test_feeds={input_name: x_test},
        calibration={input_name: x_train},
        variants=variants,
        not_applicable=not_applicable or {},
        evaluate=evaluate,
        headline="accuracy",
        tolerance=Tolerance(atol=1e-5, rtol=1e-4),
        labels=ds.target_names,
        preprocessing=ds.preprocessing,
        config={"parameters": n_params(model), **history},
        producer=producer(),
    )


@dataclass
class _Recipe:
    """What a trained classifier's variants are made from: the teacher, its data, the export
    example and names."""

    model: Classifier
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    example: list[torch.Tensor]
    names: tuple[list[str], list[str]]
    augment: Callable | None
    seed: int

    def pruned(
        self,
        prune: Callable[[nn.Module, PruneConfig], tuple[nn.Module, dict]],
        pcfg: PruneConfig,
        weight_decay: float,
    ) -> Callable[[Path], dict[str, Any]]:
        def make(path: Path) -> dict[str, Any]:
            seed_everything(self.seed)
            small = copy.deepcopy(self.model)
            small.body, info = prune(self.model.body, pcfg)
            tuned = fit(
                small,
                _cross_entropy,
                *self.data,
                augment=self.augment,
                seed=self.seed,
                epochs=pcfg.epochs,
                lr=pcfg.lr,
                weight_decay=weight_decay,
            )
            export_module(small, self.example, *self.names, path)
            return pruned_details(self.model, small, info, pcfg, tuned)

        return make

    def distilled(
        self, student: Callable[[], nn.Module], dcfg: DistillConfig
    ) -> Callable[[Path], dict[str, Any]]:
        teacher = self.model

        def make(path: Path) -> dict[str, Any]:
            seed_everything(self.seed)
            pupil = Classifier(student())
            teacher.eval()

            def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    soft = teacher.logits(x)
                return distillation_loss(m.logits(x), soft, y, dcfg)

            history = fit(
                pupil,
                loss,
                *self.data,
                augment=self.augment,
                seed=self.seed,
                epochs=dcfg.epochs,
                lr=dcfg.lr,
                weight_decay=1e-4,
            )
            export_module(pupil, self.example, *self.names, path)
            linears = [m for m in pupil.modules() if isinstance(m, nn.Linear)]
            return {
                "technique": "knowledge distillation (Hinton et al. 2015) into a smaller student",
                "student": " -> ".join(
                    [str(m.in_features) for m in linears] + [str(linears[-1].out_features)]
                ),
                **dcfg.to_dict(),
                "parameters_teacher": n_params(teacher),
                "parameters_student": n_params(pupil),
                "parameters_fewer": f"{n_params(teacher) / n_params(pupil):.1f}x",
                "training": history,
            }

        return make


def student_mlp() -> nn.Module:
    """The distillation student of the digits classifiers: 64 -> 48 -> 10."""
    return mlp([64, 48, 10])
