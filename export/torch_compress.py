"""Compression that changes the network: structured pruning and knowledge distillation.

Pruning removes whole neurons and channels, so the exported ONNX initializers really shrink
(masks that only zero weights change nothing for onnxruntime). It is dependency-aware: a
channel is removed from every layer that produces or consumes it at once, including the
channels tied together by a residual connection. The pruned network is fine-tuned afterwards.

Distillation trains a small student on the teacher's softened outputs (Hinton et al. 2015):
``loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "PruneConfig",
    "DistillConfig",
    "prune_linear_chain",
    "prune_digits_cnn",
    "distillation_loss",
    "count_parameters",
]


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


class PruneConfig:
    """Keep ``keep_ratio`` of every prunable group (at least ``min_keep`` units), then fine-tune."""

    def __init__(
        self, keep_ratio: float = 0.5, min_keep: int = 4, epochs: int = 20, lr: float = 1e-3
    ) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio, self.min_keep, self.epochs, self.lr = keep_ratio, min_keep, epochs, lr

    def keep(self, n: int) -> int:
        return max(min(self.min_keep, n), int(round(n * self.keep_ratio)))

    def to_dict(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio, "fine_tune_epochs": self.epochs, "lr": self.lr}


class DistillConfig:
    def __init__(
        self, temperature: float = 4.0, alpha: float = 0.7, epochs: int = 150, lr: float = 3e-3
    ) -> None:
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError("need temperature > 0 and 0 <= alpha <= 1")
        self.temperature, self.alpha, self.epochs, self.lr = temperature, alpha, epochs, lr

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "alpha": self.alpha,
            "epochs": self.epochs,
            "lr": self.lr,
            "loss": "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy",
        }


# ---------------------------------------------------------------------------- pruning


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order (keeps layouts stable)."""
    return torch.sort(torch.topk(scores, k).indices).values


def _linear(
    layer: nn.Linear, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> nn.Linear:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if out_idx is not None:
        w = w[out_idx]
        b = b[out_idx] if b is not None else None
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def prune_linear_chain(chain: nn.Sequential, config: PruneConfig) -> tuple[nn.Sequential, dict]:
    """Remove hidden neurons of a Linear -> activation -> ... -> Linear chain.

    A neuron's importance is the L2 norm of its incoming weights times that of its outgoing
    weights; the chain's input and output widths are kept.
    """
    layers = list(chain)
    linear_at = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    if len(linear_at) < 2:
        raise ValueError("a chain with fewer than two Linear layers has no hidden neurons")
    for m in layers:
        if not isinstance(m, nn.Linear | nn.ReLU | nn.Dropout | nn.Sigmoid | nn.Tanh):
            raise ValueError(f"cannot prune through {type(m).__name__}: only elementwise layers")
    new_layers: list[nn.Module] = [copy.deepcopy(m) for m in layers]
    kept: list[int] = []
    in_idx: torch.Tensor | None = None
    for pos, i in enumerate(linear_at):
        layer: nn.Linear = layers[i]
        if pos == len(linear_at) - 1:
            new_layers[i] = _linear(layer, None, in_idx)
            break
        nxt: nn.Linear = layers[linear_at[pos + 1]]
        w_in = layer.weight.detach()[:, in_idx] if in_idx is not None else layer.weight.detach()
        score = w_in.norm(dim=1) * nxt.weight.detach().norm(dim=0)
        out_idx = _top(score, config.keep(layer.out_features))
        new_layers[i] = _linear(layer, out_idx, in_idx)
        kept.append(len(out_idx))
        in_idx = out_idx
    widths_before = [layers[i].out_features for i in linear_at[:-1]]
    return nn.Sequential(*new_layers), {"hidden_before": widths_before, "hidden_after": kept}


def _conv(conv: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Conv2d:
    w = conv.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Conv2d(
        w.shape[1],
        w.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[out_idx] if out_idx is not None else conv.bias)
    return new


def _bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), eps=bn.eps, momentum=bn.momentum)
    with torch.no_grad():
        new.weight.copy_(bn.weight.detach()[idx])
        new.bias.copy_(bn.bias.detach()[idx])
        new.running_mean.copy_(bn.running_mean[idx])
        new.running_var.copy_(bn.running_var[idx])
    return new


def _channel_score(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Filter L2 norm times |BN gamma|: what a channel contributes after normalisation."""
    filters = conv.weight.detach().flatten(1).norm(dim=1)
    return filters * bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)


def prune_digits_cnn(cnn: nn.Module, config: PruneConfig) -> tuple[nn.Module, dict]:
    """Prune :class:`export.torch_zoo.DigitsCNN`'s three channel groups.

    1. the stem's channels, tied by the residual connection to the block's output (stem conv,
       its BN, block conv1's inputs, block conv2's outputs and BN, the downsampling conv's
       inputs): they are removed together, scored by the sum over the tied layers;
    2. the block's inner channels (conv1 outputs, BN1, conv2 inputs);
    3. the downsampling conv's outputs (its BN and the head's inputs).
    """
    f = cnn.features
    stem, stem_bn, block, down, down_bn = f[0], f[1], f[3], f[4], f[5]
    head_linear = cnn.head[1]
    width, wide = stem.out_channels, down.out_channels
    stem_score = _channel_score(stem, stem_bn) + _channel_score(block.conv2, block.bn2)
    g1 = _top(stem_score, config.keep(width))
    g2 = _top(_channel_score(block.conv1, block.bn1), config.keep(width))
    g3 = _top(_channel_score(down, down_bn), config.keep(wide))

    new = copy.deepcopy(cnn)
    nf = new.features
    nf[0] = _conv(stem, g1, None)
    nf[1] = _bn(stem_bn, g1)
    nb = nf[3]
    nb.conv1 = _conv(block.conv1, g2, g1)
    nb.bn1 = _bn(block.bn1, g2)
    nb.conv2 = _conv(block.conv2, g1, g2)
    nb.bn2 = _bn(block.bn2, g1)
    nf[4] = _conv(down, g3, g1)
    nf[5] = _bn(down_bn, g3)
    new.head[1] = _linear(head_linear, None, g3)
    return new, {
        "channels_before": {"stem+residual": width, "block inner": width, "downsample": wide},
        "channels_after": {"stem+residual": len(g1), "block inner": len(g2), "downsample": len(g3)},
    }


# ---------------------------------------------------------------------------- distillation


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: DistillConfig,
) -> torch.Tensor:
    t = config.temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
    )
    hard = F.cross_entropy(student_logits, labels)
    return config.alpha * t * t * soft + (1.0 - config.alpha) * hard


def teacher_logits(teacher: nn.Module, x: np.ndarray, batch: int = 512) -> torch.Tensor:
    teacher.eval()
    with torch.no_grad():
        parts = [
            teacher.logits(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)
        ]
    return torch.cat(parts)


def shapes(module: nn.Module) -> Sequence[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in module.named_parameters()]
