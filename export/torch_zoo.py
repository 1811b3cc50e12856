"""PyTorch models of the zoo: modules, training, and export with the dynamo ONNX exporter.

Every module's ``forward`` is exactly the graph that is served: standardisation of inputs and
de-standardisation of regression targets are buffers inside the module, classifiers return
``(label, probabilities)``, and stochastic parts (VAE sampling) stay out of the exported graphs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from torch import nn
from torch.nn import functional as F

from . import quality
from .data import Dataset, load
from .spec import OPSET, BuildContext, Feeds, Tolerance, Trained
from .torch_compress import (
    DistillConfig,
    PruneConfig,
    distillation_loss,
    prune_digits_cnn,
    prune_linear_chain,
)

__all__ = [
    "export_module",
    "torch_reference",
    "TabularRegressor",
    "Classifier",
    "DigitsCNN",
    "DenoisingAutoencoder",
    "VAE",
    "ConditionalGenerator",
    "TRAINERS",
]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def producer() -> dict[str, Any]:
    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "opset": OPSET,
    }


def export_module(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    path: Path,
) -> None:
    """Export ``module`` with the dynamo exporter, batch axis dynamic on every input.

    The example batch must be >= 2: torch.export specialises a size-1 axis to a constant.
    """
    if any(t.shape[0] < 2 for t in example):
        raise ValueError("export examples need batch >= 2, or the batch axis becomes static")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic_shapes = tuple({0: batch} for _ in example)
    # the exporter logs a warning per optional torchvision op on every call
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            module.eval(),
            tuple(example),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )


def torch_reference(module: nn.Module, input_names: Sequence[str]) -> Callable:
    """The source model as a feeds -> outputs function, for parity checks."""

    def run(feeds: Feeds) -> list[np.ndarray]:
        module.eval()
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in input_names))
        outs = out if isinstance(out, tuple) else (out,)
        return [o.numpy() for o in outs]

    return run


def rows(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of ``x``, cycling when it has fewer."""
    return np.take(x, np.arange(n) % len(x), axis=0)


def n_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ---------------------------------------------------------------------------- modules


class Standardize(nn.Module):
    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer(
            "std", torch.as_tensor(np.where(std > 0, std, 1.0), dtype=torch.float32)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


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


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class DigitsCNN(nn.Module):
    """ResNet-style CNN for [N, 1, 8, 8] digits: stem, one residual block, downsample, head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            ResidualBlock(width),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DenoisingAutoencoder(nn.Module):
    """64 pixels -> 16-d embedding -> 64 pixels; trained to undo noise and masking."""

    def __init__(self, latent: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, 64), nn.ReLU(), nn.Linear(64, 64), nn.Sigmoid()
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(pixels)
        return self.decoder(embedding), embedding


class VAE(nn.Module):
    def __init__(self, latent: int = 8, hidden: int = 128) -> None:
        super().__init__()
        self.latent = latent
        self.enc = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, latent)
        self.log_var = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 64), nn.Sigmoid()
        )


class VAEEncoder(nn.Module):
    """Deterministic half of the VAE: pixels -> (mean, log-variance) of q(z | x)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.vae.enc(pixels)
        return self.vae.mean(h), self.vae.log_var(h)


class VAEDecoder(nn.Module):
    """Generator half of the VAE: a latent vector (e.g. drawn from N(0, I)) -> 64 pixels."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.dec(latent)


class ConditionalGenerator(nn.Module):
    """DCGAN-style generator: (noise, digit label) -> [N, 1, 8, 8] image via transposed convs."""

    def __init__(self, noise_dim: int = 32, n_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.embed = nn.Embedding(n_classes, n_classes)
        self.project = nn.Sequential(nn.Linear(noise_dim + n_classes, 2 * width * 4), nn.ReLU())
        self.width = width
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),  # 2x2 -> 4x4
            nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),  # 4x4 -> 8x8
            nn.Sigmoid(),
        )

    def forward(self, noise: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([noise, self.embed(label)], dim=1))
        return self.deconv(h.view(-1, 2 * self.width, 2, 2))


class ProjectionDiscriminator(nn.Module):
    """Conv discriminator with a class projection term (Miyato & Koyama 2018)."""

    def __init__(self, n_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, 128),
            nn.LeakyReLU(0.2),
        )
        self.out = nn.Linear(128, 1)
        self.embed = nn.Embedding(n_classes, 128)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.features(image)
        return self.out(h).squeeze(1) + (self.embed(label) * h).sum(1)


# ---------------------------------------------------------------------------- training


def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int,
) -> dict[str, Any]:
    """Adam with cosine decay; keeps the weights of the epoch with the lowest validation loss."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best = (float("inf"), copy.deepcopy(model.state_dict()), 0)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            xb = xt[idx] if augment is None else augment(xt[idx])
            loss = loss_fn(model, xb, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model, xv, yv))
        if val < best[0]:
            best = (val, copy.deepcopy(model.state_dict()), epoch)
    model.load_state_dict(best[1])
    model.eval()
    return {
        "epochs": epochs,
        "best_epoch": best[2],
        "val_loss": best[0],
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
    }


def _mse_std(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y_std = (y - model.y_mean) / model.y_std
    return F.mse_loss(model.standardized(x).squeeze(1), y_std)


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = model.logits(x)
    if getattr(model, "binary", False):
        return F.binary_cross_entropy_with_logits(z.squeeze(1), y.float())
    return F.cross_entropy(z, y)


def _random_shift(images: torch.Tensor) -> torch.Tensor:
    """Shift each 8x8 digit by up to one pixel (zero padded): cheap, label-preserving."""
    n = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,)).tolist()
    shifted = padded[:, :, dy : dy + 8, dx : dx + 8]
    keep = torch.rand(n, 1, 1, 1) < 0.5
    return torch.where(keep, images, shifted)


def _regressor(ds: Dataset, hidden: Sequence[int], ctx: BuildContext, **train: Any) -> Trained:
    seed_everything(ctx.seed)
    model = TabularRegressor(ds.x_train, ds.y_train, hidden, dropout=0.1 if hidden else 0.0)
    history = fit(
        model, _mse_std, ds.x_train, ds.y_train, ds.x_val, ds.y_val, seed=ctx.seed, **train
    )
    names = ["features"], ["prediction"]
    reference = torch_reference(model, names[0])
    example = [torch.from_numpy(ds.x_test[:4])]
    variants, not_applicable = (
        {},
        {"distilled": "distillation here trains on a classifier's softened class probabilities"},
    )
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
            return _pruned_details(model, student, info, config, tuned)

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


def _pruned_details(
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


def _classifier(
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
    variants: dict[str, Callable[[Path], dict[str, Any]]] = {}
    if prune is not None:
        pcfg = prune_config or PruneConfig()

        def pruned(path: Path) -> dict[str, Any]:
            seed_everything(ctx.seed)
            small = copy.deepcopy(model)
            small.body, info = prune(model.body, pcfg)
            tuned = fit(
                small,
                _cross_entropy,
                *data,
                augment=augment,
                seed=ctx.seed,
                epochs=pcfg.epochs,
                lr=pcfg.lr,
                weight_decay=train.get("weight_decay", 0.0),
            )
            export_module(small, example, *names, path)
            return _pruned_details(model, small, info, pcfg, tuned)

        variants["pruned"] = pruned
    if student is not None:
        dcfg = distill_config or DistillConfig()

        def distilled(path: Path) -> dict[str, Any]:
            seed_everything(ctx.seed)
            pupil = Classifier(student())
            model.eval()

            def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    soft = model.logits(x)
                return distillation_loss(m.logits(x), soft, y, dcfg)

            history = fit(
                pupil,
                loss,
                *data,
                augment=augment,
                seed=ctx.seed,
                epochs=dcfg.epochs,
                lr=dcfg.lr,
                weight_decay=1e-4,
            )
            export_module(pupil, example, *names, path)
            linears = [m for m in pupil.modules() if isinstance(m, nn.Linear)]
            return {
                "technique": "knowledge distillation (Hinton et al. 2015) into a smaller student",
                "student": " -> ".join(
                    [str(m.in_features) for m in linears] + [str(linears[-1].out_features)]
                ),
                **dcfg.to_dict(),
                "parameters_teacher": n_params(model),
                "parameters_student": n_params(pupil),
                "parameters_fewer": f"{n_params(model) / n_params(pupil):.1f}x",
                "training": history,
            }

        variants["distilled"] = distilled
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


_LINEAR_NOT_APPLICABLE = {
    "pruned": "a single linear layer has no hidden neurons to remove",
    "distilled": "a single linear layer: there is no smaller student to distill into",
}
_GENERATIVE_NOT_APPLICABLE = {
    "pruned": "pruning is built for the MLP and CNN classifiers and the MLP regressor; "
    "fine-tuning a generative model needs its own loss and quality judge (left out)",
    "distilled": "distillation here trains on a classifier's softened class probabilities",
}


def _student_mlp() -> nn.Module:
    """The distillation student of the digits classifiers: 64 -> 48 -> 10."""
    return mlp([64, 48, 10])


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
    trained = _classifier(
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
    trained = _classifier(
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
    trained = _classifier(
        ds,
        model,
        ctx,
        prune=prune_linear_chain,
        prune_config=PruneConfig(keep_ratio=0.25, epochs=30, lr=1e-3),
        student=_student_mlp,
        epochs=100,
        lr=2e-3,
        weight_decay=1e-4,
    )
    trained.config["architecture"] = "64 -> 256 -> 128 -> 10, ReLU, dropout 0.2"
    return trained


def digits_cnn(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    seed_everything(ctx.seed)
    model = Classifier(DigitsCNN(width=32))
    trained = _classifier(
        ds,
        model,
        ctx,
        input_shape=(1, 8, 8),
        augment=_random_shift,
        prune=prune_digits_cnn,
        prune_config=PruneConfig(keep_ratio=0.5, epochs=20, lr=1e-3),
        student=lambda: nn.Sequential(nn.Flatten(), _student_mlp()),
        epochs=40,
        lr=3e-3,
        weight_decay=1e-4,
    )
    trained.config["architecture"] = (
        "conv3x3(32)+BN -> residual block [conv3x3+BN, conv3x3+BN, skip] -> conv3x3/2(64)+BN "
        "-> global avg pool -> dropout -> linear(64, 10)"
    )
    return trained


def digits_autoencoder(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    seed_everything(ctx.seed)
    model = DenoisingAutoencoder(latent=16)
    gen = torch.Generator().manual_seed(ctx.seed)

    def corrupt(x: torch.Tensor) -> torch.Tensor:
        noisy = x + 0.1 * torch.randn(x.shape, generator=gen)
        mask = torch.rand(x.shape, generator=gen) < 0.1
        return noisy.masked_fill(mask, 0.0).clamp(0.0, 1.0)

    def loss(m: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(m(corrupt(target) if m.training else x)[0], target)

    history = fit(
        model, loss, ds.x_train, ds.x_train, ds.x_val, ds.x_val, epochs=150, lr=3e-3, seed=ctx.seed
    )
    noisy_test = corrupt(torch.from_numpy(ds.x_test)).numpy()

    def evaluate(run: Callable) -> dict[str, float]:
        clean, _ = run({"pixels": ds.x_test})
        denoised, _ = run({"pixels": noisy_test})
        return {
            "reconstruction_mse": quality.reconstruction(ds.x_test, clean),
            "denoising_mse": quality.reconstruction(ds.x_test, denoised),
            "noisy_input_mse": quality.reconstruction(ds.x_test, noisy_test),
        }

    names = ["pixels"], ["reconstruction", "embedding"]
    return Trained(
        export=lambda p: export_module(model, [torch.from_numpy(ds.x_test[:4])], *names, p),
        reference=torch_reference(model, names[0]),
        feeds=lambda n: {"pixels": rows(ds.x_test, n)},
        test_feeds={"pixels": ds.x_test},
        calibration={"pixels": ds.x_train},
        not_applicable=_GENERATIVE_NOT_APPLICABLE,
        evaluate=evaluate,
        headline="reconstruction_mse",
        preprocessing=ds.preprocessing,
        config={
            "architecture": "64 -> 64 -> 16 (embedding) -> 64 -> 64, sigmoid",
            "noise": "gaussian sigma 0.1 + 10% pixels masked to 0",
            "parameters": n_params(model),
            **history,
        },
        producer=producer(),
    )


@cache
def _train_vae(seed: int) -> tuple[VAE, dict[str, Any]]:
    ds = load("digits", seed)
    seed_everything(seed)
    vae = VAE(latent=8)
    gen = torch.Generator().manual_seed(seed)

    def loss(m: nn.Module, x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        h = m.enc(x)
        mean, log_var = m.mean(h), m.log_var(h)
        z = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=gen)
        recon = F.binary_cross_entropy(m.dec(z), x, reduction="sum")
        kl = -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp())
        return (recon + kl) / x.shape[0]

    history = fit(
        vae, loss, ds.x_train, ds.x_train, ds.x_val, ds.x_val, epochs=200, lr=2e-3, seed=seed
    )
    vae.eval()
    return vae, history


def digits_vae_encoder(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    vae, history = _train_vae(ctx.seed)
    encoder = VAEEncoder(vae).eval()

    def evaluate(run: Callable) -> dict[str, float]:
        mean, log_var = run({"pixels": ds.x_test})
        with torch.no_grad():
            recon = vae.dec(torch.from_numpy(mean)).numpy()
        kl = -0.5 * np.sum(1 + log_var - mean**2 - np.exp(log_var), axis=1)
        return {
            "reconstruction_mse": quality.reconstruction(ds.x_test, recon),
            "kl_divergence": float(kl.mean()),
        }

    names = ["pixels"], ["mean", "log_variance"]
    return Trained(
        export=lambda p: export_module(encoder, [torch.from_numpy(ds.x_test[:4])], *names, p),
        reference=torch_reference(encoder, names[0]),
        feeds=lambda n: {"pixels": rows(ds.x_test, n)},
        test_feeds={"pixels": ds.x_test},
        calibration={"pixels": ds.x_train},
        not_applicable=_GENERATIVE_NOT_APPLICABLE,
        evaluate=evaluate,
        headline="reconstruction_mse",
        preprocessing=ds.preprocessing,
        config={
            "architecture": "64 -> 128 -> (mean 8, log-variance 8)",
            "parameters": n_params(vae),
            "pair": "digits-vae-decoder",
            **history,
        },
        producer=producer(),
    )


def _latent_feeds(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def digits_vae_decoder(ctx: BuildContext) -> Trained:
    vae, history = _train_vae(ctx.seed)
    decoder = VAEDecoder(vae).eval()
    judge = ctx.model_runner("digits-cnn")
    sample = {"latent": _latent_feeds(1000, vae.latent, ctx.seed)}
    names = ["latent"], ["image"]
    return Trained(
        export=lambda p: export_module(
            decoder, [torch.from_numpy(sample["latent"][:4])], *names, p
        ),
        reference=torch_reference(decoder, names[0]),
        feeds=lambda n: {"latent": sample["latent"][:n]},
        test_feeds=sample,
        # calibration: other draws from the same prior N(0, I) (a different seed)
        calibration={"latent": _latent_feeds(1024, vae.latent, ctx.seed + 1)},
        not_applicable=_GENERATIVE_NOT_APPLICABLE,
        evaluate=lambda run: quality.generated_digits(run(sample)[0], judge),
        headline="confident_share",
        preprocessing={
            "description": "input: latent vectors drawn from N(0, I), 8 dimensions; "
            "output: 64 pixels in [0, 1] (reshape to 8x8)",
            "latent_dim": vae.latent,
        },
        config={
            "architecture": "8 -> 128 -> 64, sigmoid",
            "parameters": n_params(vae.dec),
            "pair": "digits-vae-encoder",
            "judge": "digits-cnn",
            **history,
        },
        producer=producer(),
    )


def digits_gan(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    seed_everything(ctx.seed)
    gen_model, disc = ConditionalGenerator(noise_dim=32), ProjectionDiscriminator()
    rng = torch.Generator().manual_seed(ctx.seed)
    x = torch.from_numpy(np.concatenate([ds.x_train, ds.x_val]).reshape(-1, 1, 8, 8))
    y = torch.from_numpy(np.concatenate([ds.y_train, ds.y_val]))
    opt_g = torch.optim.Adam(gen_model.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    steps, batch = 1500, 64
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=rng)
        real, label = x[idx], y[idx]
        noise = torch.randn(batch, 32, generator=rng)
        fake_label = torch.randint(0, 10, (batch,), generator=rng)
        fake = gen_model(noise, fake_label)
        # hinge loss (Lim & Ye 2017), as in SNGAN / projection discriminators
        d_loss = (
            F.relu(1 - disc(real, label)).mean()
            + F.relu(1 + disc(fake.detach(), fake_label)).mean()
        )
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = -disc(fake, fake_label).mean()
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
    gen_model.eval()

    judge = ctx.model_runner("digits-cnn")
    sample_rng = np.random.default_rng(ctx.seed)
    requested = np.repeat(np.arange(10, dtype=np.int64), 100)
    sample = {
        "noise": sample_rng.standard_normal((1000, 32)).astype(np.float32),
        "label": requested,
    }
    names = ["noise", "label"], ["image"]
    example = [torch.from_numpy(sample["noise"][:4]), torch.from_numpy(requested[::250][:4])]
    return Trained(
        export=lambda p: export_module(gen_model, example, *names, p),
        reference=torch_reference(gen_model, names[0]),
        feeds=lambda n: {k: rows(v[::7], n) for k, v in sample.items()},
        test_feeds=sample,
        calibration={
            "noise": np.random.default_rng(ctx.seed + 1).standard_normal((1000, 32), np.float32),
            "label": np.tile(np.arange(10, dtype=np.int64), 100),
        },
        not_applicable=_GENERATIVE_NOT_APPLICABLE,
        evaluate=lambda run: quality.generated_digits(run(sample)[0], judge, requested),
        headline="confident_share",
        labels=[str(d) for d in range(10)],
        preprocessing={
            "description": "inputs: noise from N(0, I) (32 dims) and the digit to draw "
            "(INT64 0..9); output: [N, 1, 8, 8] pixels in [0, 1]",
            "noise_dim": 32,
        },
        config={
            "architecture": "noise(32) + embed(label) -> linear -> 128x2x2 -> convT -> 64x4x4 "
            "-> convT -> 1x8x8, sigmoid; projection discriminator, hinge loss",
            "parameters": n_params(gen_model),
            "steps": steps,
            "batch_size": batch,
            "lr": 2e-3,
            "judge": "digits-cnn",
        },
        producer=producer(),
    )


#: name -> trainer, in the order the zoo lists them
TRAINERS: dict[str, Callable[[BuildContext], Trained]] = {
    "diabetes-linear": diabetes_linear,
    "diabetes-mlp": diabetes_mlp,
    "breast-cancer-logreg": breast_cancer_logreg,
    "digits-logreg": digits_logreg,
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "digits-autoencoder": digits_autoencoder,
    "digits-vae-encoder": digits_vae_encoder,
    "digits-vae-decoder": digits_vae_decoder,
    "digits-gan": digits_gan,
}
