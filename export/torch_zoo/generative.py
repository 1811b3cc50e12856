"""Generative models of digits: the denoising autoencoder, the VAE (encoder and decoder served
apart), and the conditional GAN with a projection discriminator."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import quality
from ..data import load, rows
from ..spec import BuildContext, Trained
from .common import export_module, fit, n_params, producer, seed_everything, torch_reference


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


_GENERATIVE_NOT_APPLICABLE = {
    "pruned": "pruning is built for the MLP and CNN classifiers and the MLP regressor; "
    "fine-tuning a generative model needs its own loss and quality judge (left out)",
    "distilled": "distillation here trains on a classifier's softened class probabilities",
}


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
    sample: dict[str, np.ndarray] = {
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
