"""Recurrent forecasters (LSTM, GRU) of a monthly series, exported with a dynamic time axis.

The model reads a history of any length in the series' own units (``history``, float32,
``[batch, time]``) and answers the next ``horizon`` months in the same units (``forecast``,
``[batch, horizon]``): the scaling (the training part's mean and standard deviation) is a
buffer inside the graph, so a client never scales anything. Training uses windows of
``window`` months from the series before ``test_start`` (the last fifth of those windows for
validation, the best epoch kept); the held-out tail is scored like the baselines in
:mod:`export.baselines`: from every origin of the tail, the last ``window`` months in, the next
``horizon`` months out, mean absolute error over all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import baselines
from ..baselines import forecast_origins
from ..corpora import SeriesData, sunspots
from ..data import rows
from ..spec import BuildContext, Runner, Tolerance, Trained
from .common import export_module, fit, n_params, producer, seed_everything, torch_reference

__all__ = [
    "Forecaster",
    "export_forecaster",
    "rolling_mae",
    "sunspots_gru",
    "sunspots_lstm",
    "train_forecaster",
    "windows",
]

#: the held-out tail: the last fifth of the series (never seen in training or validation)
TEST_FRACTION = 0.2
WINDOW, HORIZON, SEASON = 120, 12, 12

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class Forecaster(nn.Module):
    """Scale, a recurrent layer over the months, a linear head on its last state, unscale."""

    def __init__(self, cell: str, hidden: int, horizon: int, mean: float, std: float) -> None:
        super().__init__()
        self.rnn = CELLS[cell](1, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, horizon)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(((history - self.mean) / self.std).unsqueeze(-1))
        return self.head(out[:, -1]) * self.std + self.mean


def windows(series: np.ndarray, window: int, horizon: int, end: int) -> tuple[np.ndarray, ...]:
    """Every ``(history, future)`` pair lying in ``series[:end]``, float32."""
    starts = range(0, end - window - horizon + 1)
    x = np.stack([series[s : s + window] for s in starts]).astype(np.float32)
    y = np.stack([series[s + window : s + window + horizon] for s in starts]).astype(np.float32)
    return x, y


def train_forecaster(
    cell: str,
    series: np.ndarray,
    test_start: int,
    *,
    window: int = 120,
    horizon: int = 12,
    hidden: int = 32,
    epochs: int = 40,
    seed: int = 0,
) -> tuple[Forecaster, dict[str, Any]]:
    """A forecaster fitted on windows before ``test_start`` (the held-out tail never seen)."""
    seed_everything(seed)
    x, y = windows(series, window, horizon, test_start)
    cut = int(len(x) * 0.8)
    train = series[:test_start]
    model = Forecaster(cell, hidden, horizon, float(train.mean()), float(train.std()))

    def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.l1_loss((m(xb) - m.mean) / m.std, (yb - m.mean) / m.std)

    history = fit(
        model, loss, x[:cut], y[:cut], x[cut:], y[cut:], epochs=epochs, lr=3e-3, seed=seed
    )
    config = {
        "cell": cell,
        "hidden": hidden,
        "window": window,
        "horizon": horizon,
        "parameters": n_params(model),
        "train_windows": cut,
        "val_windows": len(x) - cut,
        **history,
    }
    return model, config


def rolling_mae(
    run: Runner, series: np.ndarray, test_start: int, window: int, horizon: int
) -> float:
    """MAE of ``run`` (feeds -> [forecast]) from every origin of the tail, ``window`` months
    of history each: the protocol of :func:`export.baselines.naive_mae`."""
    origins = list(forecast_origins(len(series), test_start, horizon))
    history = np.stack([series[t - window : t] for t in origins]).astype(np.float32)
    truth = np.stack([series[t : t + horizon] for t in origins])
    [forecast] = run({"history": history})
    return float(np.abs(forecast - truth).mean())


def export_forecaster(model: Forecaster, path: Path) -> None:
    """``model`` to ONNX with dynamic batch and time axes."""
    example = torch.linspace(10.0, 90.0, 96).reshape(2, 48)
    export_module(model, [example], ["history"], ["forecast"], path, shared_axes={1: "time"})


def _sunspots(cell: str, ctx: BuildContext) -> Trained:
    """A forecaster of the monthly sunspot numbers, judged on the held-out tail against the
    naive and seasonal-naive forecasts."""
    data = sunspots()
    series = data.values
    test_start = int(len(series) * (1 - TEST_FRACTION))
    model, config = train_forecaster(
        cell, series, test_start, window=WINDOW, horizon=HORIZON, seed=ctx.seed
    )
    origins = list(forecast_origins(len(series), test_start, HORIZON))
    history = np.stack([series[t - WINDOW : t] for t in origins]).astype(np.float32)
    truth = np.stack([series[t : t + HORIZON] for t in origins])
    test_feeds = {"history": history}
    train_x, _ = windows(series, WINDOW, HORIZON, test_start)

    def evaluate(run: Runner) -> dict[str, float]:
        [forecast] = run(test_feeds)
        error = forecast - truth
        return {
            "mae": float(np.abs(error).mean()),
            "rmse": float(np.sqrt((error**2).mean())),
            "mae_first_month": float(np.abs(error[:, 0]).mean()),
        }

    return Trained(
        export=lambda p: export_forecaster(model, p),
        reference=torch_reference(model, ["history"]),
        feeds=lambda n: {"history": rows(history, n)},
        test_feeds=test_feeds,
        calibration={"history": train_x[:: max(1, len(train_x) // 256)]},
        evaluate=evaluate,
        headline="mae",
        tolerance=Tolerance(atol=1e-3, rtol=1e-5),  # sunspot numbers run 0..254
        preprocessing={
            "description": "monthly mean sunspot numbers in their own units, oldest first; "
            "the model scales them itself (the training part's mean and standard deviation "
            f"are inside the graph). Trained on {WINDOW}-month histories; any length is "
            f"accepted. Answers the next {HORIZON} months.",
            "window": WINDOW,
            "horizon": HORIZON,
            "scaling": {"mean": float(model.mean), "std": float(model.std), "in_graph": True},
        },
        dataset=_dataset_record(data, test_start, config, len(origins), ctx.seed),
        baselines=_baselines(series, test_start),
        not_applicable={
            "pruned": "structured pruning removes neurons of linear and convolutional layers; "
            "a recurrent layer's gates share its hidden units (not implemented)",
            "distilled": f"the {config['parameters']:,}-parameter network is already small; "
            "no smaller recurrent student is defined",
        },
        config=config,
        producer=producer(),
    )


def _dataset_record(
    data: SeriesData, test_start: int, config: dict[str, Any], test_origins: int, seed: int
) -> dict[str, Any]:
    year, month = divmod(test_start, 12)
    return {
        **data.record,
        "name": data.name,
        "n_samples": len(data.values),
        "start": data.start,
        "split": {
            "method": f"chronological: the last {TEST_FRACTION:.0%} is the held-out tail",
            "seed": seed,
            "test_start": f"{int(data.start[:4]) + year}-{month + 1:02d}",
            "sizes": {
                "train": config["train_windows"],
                "validation": config["val_windows"],
                "test": test_origins,
            },
            "evaluation": f"every origin of the tail, the {WINDOW} months before it in, "
            f"the next {HORIZON} out (MAE over all of them)",
        },
    }


def _baselines(series: np.ndarray, test_start: int) -> dict[str, Any]:
    naive = baselines.naive_mae(series, test_start, HORIZON)
    seasonal = baselines.seasonal_naive_mae(series, test_start, HORIZON, SEASON)
    return {
        "naive": {
            "metric": "mae",
            "value": naive,
            "what": "every future month equals the last one seen",
        },
        "seasonal-naive": {
            "metric": "mae",
            "value": seasonal,
            "what": f"each month equals the one {SEASON} months earlier",
        },
    }


def sunspots_lstm(ctx: BuildContext) -> Trained:
    return _sunspots("lstm", ctx)


def sunspots_gru(ctx: BuildContext) -> Trained:
    return _sunspots("gru", ctx)
