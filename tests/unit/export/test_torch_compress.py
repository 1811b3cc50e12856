"""Structured pruning really removes neurons and channels; distillation's loss is Hinton's."""

from __future__ import annotations

import torch
from torch import nn

from export.torch_compress import (
    DistillConfig,
    PruneConfig,
    count_parameters,
    distillation_loss,
    prune_digits_cnn,
    prune_linear_chain,
)
from export.torch_zoo import Classifier, DigitsCNN, mlp


def test_linear_chain_loses_hidden_neurons_and_keeps_its_ends() -> None:
    torch.manual_seed(0)
    chain = mlp([64, 256, 128, 10], dropout=0.2).eval()
    pruned, info = prune_linear_chain(chain, PruneConfig(keep_ratio=0.25))
    assert info == {"hidden_before": [256, 128], "hidden_after": [64, 32]}
    linears = [m for m in pruned if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 32), (32, 10)]
    assert count_parameters(pruned) < count_parameters(chain) / 5
    x = torch.randn(5, 64)
    assert pruned(x).shape == (5, 10)


def test_keeping_everything_changes_nothing() -> None:
    torch.manual_seed(0)
    chain = mlp([8, 16, 3]).eval()
    same, _ = prune_linear_chain(chain, PruneConfig(keep_ratio=1.0))
    x = torch.randn(4, 8)
    torch.testing.assert_close(same(x), chain(x))


def test_cnn_pruning_is_dependency_aware_across_the_residual_connection() -> None:
    torch.manual_seed(0)
    model = Classifier(DigitsCNN(width=32)).eval()
    # non-trivial BN statistics, as after training
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.1, 1.0)
    body, info = prune_digits_cnn(model.body, PruneConfig(keep_ratio=0.5))
    assert info["channels_after"] == {"stem+residual": 16, "block inner": 16, "downsample": 32}
    assert count_parameters(body) < 0.5 * count_parameters(model.body)
    block = body.features[3]
    assert block.conv1.in_channels == block.conv2.out_channels == body.features[0].out_channels
    out = body.eval()(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)


def test_distillation_loss_is_zero_soft_term_when_student_matches_teacher() -> None:
    logits = torch.randn(6, 10)
    labels = logits.argmax(1)
    only_soft = DistillConfig(alpha=1.0)
    assert distillation_loss(logits, logits, labels, only_soft).abs() < 1e-6
    other = torch.randn(6, 10)
    assert distillation_loss(other, logits, labels, only_soft) > 0
