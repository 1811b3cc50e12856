"""The automatic choice: the fastest variant within an accuracy budget becomes the default.

A variant is eligible when its headline test metric stays within the budget of FP32's (an
absolute drop in points for metrics where higher is better, a relative increase for errors
where lower is better). Among eligible variants the one with the highest batch-32 throughput
wins, if it beats FP32 by at least ``min_speedup`` (timing noise is a few percent); otherwise
FP32 stays the default. The reasons are written into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .measure import REFERENCE, Measurement

__all__ = ["Budget", "Choice", "HIGHER_IS_BETTER", "LOWER_IS_BETTER", "choose"]

HIGHER_IS_BETTER = frozenset(
    {
        "accuracy",
        "macro_f1",
        "r2",
        "confident_share",
        "label_agreement",
        "classes_covered",
        "adjusted_rand_index",
        "normalized_mutual_info",
        "purity",
        "explained_variance",
        "probe_accuracy",
        "cosine_to_fp32",
        "cosine_to_fp32_min",
    }
)
LOWER_IS_BETTER = frozenset(
    {
        "rmse",
        "mae",
        "mae_first_month",
        "reconstruction_mse",
        "denoising_mse",
        "kl_divergence",
        "reconstruction_error",
    }
)
#: the batch size whose throughput decides "fastest" (what dynamic batching produces under load)
SPEED_BATCH = 32


@dataclass(frozen=True)
class Budget:
    """How much quality a faster variant may cost.

    ``max_accuracy_drop``: absolute drop (0.01 = 1 percentage point) for higher-is-better
    metrics; ``max_error_increase``: relative increase (0.02 = 2%) for lower-is-better ones
    (RMSE, reconstruction MSE).
    """

    max_accuracy_drop: float = 0.01
    max_error_increase: float = 0.02
    min_speedup: float = 1.05

    def __post_init__(self) -> None:
        if self.max_accuracy_drop < 0 or self.max_error_increase < 0:
            raise ValueError("accuracy budgets must be >= 0")
        if self.min_speedup < 1.0:
            raise ValueError(f"min_speedup must be >= 1.0, got {self.min_speedup}")

    def to_dict(self) -> dict[str, float]:
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_error_increase": self.max_error_increase,
            "min_speedup": self.min_speedup,
        }

    def check(self, metric: str, reference: float, value: float) -> tuple[bool, str]:
        """Whether ``value`` is within budget of ``reference``, and a sentence saying so."""
        if metric in LOWER_IS_BETTER:
            limit = reference * (1 + self.max_error_increase)
            ok = value <= limit + 1e-12
            change = (value / reference - 1) if reference else 0.0
            return ok, (
                f"{metric} {value:.4g} vs {reference:.4g} ({change:+.1%}; budget "
                f"+{self.max_error_increase:.0%})"
            )
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"no budget rule for metric {metric!r}: say whether higher is better")
        drop = reference - value
        ok = drop <= self.max_accuracy_drop + 1e-12
        return ok, (
            f"{metric} {value:.4g} vs {reference:.4g} ({-drop * 100:+.2f} pt; budget "
            f"-{self.max_accuracy_drop * 100:.1f} pt)"
        )


@dataclass
class Choice:
    default: str
    reason: str
    #: variant -> {"eligible": bool, "why": str}
    verdicts: dict[str, dict[str, Any]]


def choose(measurements: dict[str, Measurement], metric: str, budget: Budget) -> Choice:
    """Pick the default among measured variants (``measurements`` includes FP32)."""
    ref = measurements[REFERENCE]
    verdicts: dict[str, dict[str, Any]] = {REFERENCE: {"eligible": True, "why": "the reference"}}
    candidates = []
    for variant, m in measurements.items():
        if variant == REFERENCE:
            continue
        ok, why = budget.check(metric, ref.metrics[metric], m.metrics[metric])
        speed = m.speedup[SPEED_BATCH]
        verdicts[variant] = {
            "eligible": ok,
            "why": f"{why}; {speed:.2f}x FP32 throughput at batch {SPEED_BATCH}",
        }
        if ok:
            candidates.append((speed, variant))
    if not candidates:
        return Choice(REFERENCE, "no compressed variant is within the accuracy budget", verdicts)
    speed, best = max(candidates)
    if speed < budget.min_speedup:
        return Choice(
            REFERENCE,
            f"the fastest variant within budget, {best}, is {speed:.2f}x FP32 at batch "
            f"{SPEED_BATCH}: below the {budget.min_speedup:.2f}x needed to replace FP32",
            verdicts,
        )
    return Choice(
        best,
        f"{best} is the fastest variant within the accuracy budget: {verdicts[best]['why']}",
        verdicts,
    )
