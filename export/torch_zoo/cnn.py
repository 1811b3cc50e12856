"""The digits CNN: a small residual convolutional network, trained with random shifts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..data import load
from ..spec import BuildContext, Trained
from ..torch_compress import (
    PruneConfig,
    prune_digits_cnn,
)
from .classifiers import Classifier, student_mlp, train_classifier
from .common import seed_everything


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


def _random_shift(images: torch.Tensor) -> torch.Tensor:
    """Shift each 8x8 digit by up to one pixel (zero padded): cheap, label-preserving."""
    n = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,)).tolist()
    shifted = padded[:, :, dy : dy + 8, dx : dx + 8]
    keep = torch.rand(n, 1, 1, 1) < 0.5
    return torch.where(keep, images, shifted)


def digits_cnn(ctx: BuildContext) -> Trained:
    ds = load("digits", ctx.seed)
    seed_everything(ctx.seed)
    model = Classifier(DigitsCNN(width=32))
    trained = train_classifier(
        ds,
        model,
        ctx,
        input_shape=(1, 8, 8),
        augment=_random_shift,
        prune=prune_digits_cnn,
        prune_config=PruneConfig(keep_ratio=0.5, epochs=20, lr=1e-3),
        student=lambda: nn.Sequential(nn.Flatten(), student_mlp()),
        epochs=40,
        lr=3e-3,
        weight_decay=1e-4,
    )
    trained.config["architecture"] = (
        "conv3x3(32)+BN -> residual block [conv3x3+BN, conv3x3+BN, skip] -> conv3x3/2(64)+BN "
        "-> global avg pool -> dropout -> linear(64, 10)"
    )
    return trained
