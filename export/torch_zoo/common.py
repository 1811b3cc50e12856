"""What every PyTorch model of the zoo shares: seeding, the dynamo ONNX export with a dynamic
batch axis, the torch reference for parity checks, the input standardisation module, MLP bodies
and the training loop."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from torch import nn

from ..spec import OPSET, Feeds


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
    shared_axes: Mapping[int, str] | None = None,
) -> None:
    """Export ``module`` with the dynamo exporter, batch axis dynamic on every input, and each
    axis of ``shared_axes`` (index -> name, e.g. ``{1: "sequence"}``) dynamic too, one size
    shared by every input.

    The example batch must be >= 2: torch.export specialises a size-1 axis to a constant (the
    same holds for the shared axes).
    """
    if any(t.shape[0] < 2 for t in example):
        raise ValueError("export examples need batch >= 2, or the batch axis becomes static")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    shared = {i: torch.export.Dim(n, min=1, max=1 << 16) for i, n in (shared_axes or {}).items()}
    dynamic_shapes = tuple({0: batch, **shared} for _ in example)
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


def n_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


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
