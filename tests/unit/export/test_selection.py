"""The automatic choice on constructed measurements."""

from __future__ import annotations

import pytest

from export.measure import Measurement
from export.selection import Budget, choose


def m(variant: str, metric: str, value: float, speed32: float, speed1: float = 1.0) -> Measurement:
    return Measurement(
        variant=variant,
        metrics={metric: value},
        size_bytes=1000,
        parameters=10,
        latency={1: {"p50_us": 10 / speed1}, 32: {"p50_us": 100 / speed32}},
        label_agreement=None,
        max_abs_diff=None,
        speedup={1: speed1, 32: speed32},
    )


def test_fastest_variant_within_the_budget_wins() -> None:
    ms = {
        "fp32": m("fp32", "accuracy", 0.990, 1.0),
        "int8-static": m("int8-static", "accuracy", 0.985, 1.8),  # -0.5 pt: eligible
        "pruned": m("pruned", "accuracy", 0.975, 3.0),  # -1.5 pt: fastest, over budget
        "int8-dynamic": m("int8-dynamic", "accuracy", 0.990, 1.3),
    }
    choice = choose(ms, "accuracy", Budget())
    assert choice.default == "int8-static"
    assert choice.verdicts["pruned"]["eligible"] is False
    assert "-1.50 pt" in choice.verdicts["pruned"]["why"]
    assert "int8-static is the fastest variant within the accuracy budget" in choice.reason
    # a looser budget admits the pruned network
    assert choose(ms, "accuracy", Budget(max_accuracy_drop=0.02)).default == "pruned"


def test_fp32_stays_when_nothing_eligible_is_faster_enough() -> None:
    ms = {
        "fp32": m("fp32", "accuracy", 0.99, 1.0),
        "int8-dynamic": m("int8-dynamic", "accuracy", 0.99, 1.02),
    }
    choice = choose(ms, "accuracy", Budget())
    assert choice.default == "fp32"
    assert "below the 1.05x needed" in choice.reason


def test_fp32_stays_when_nothing_is_within_budget() -> None:
    ms = {
        "fp32": m("fp32", "accuracy", 0.99, 1.0),
        "distilled": m("distilled", "accuracy", 0.95, 9.0),
    }
    assert choose(ms, "accuracy", Budget()).default == "fp32"


def test_errors_are_judged_relative_and_lower_is_better() -> None:
    ms = {
        "fp32": m("fp32", "rmse", 50.0, 1.0),
        "int8-static": m("int8-static", "rmse", 50.9, 1.5),  # +1.8%: eligible
        "pruned": m("pruned", "rmse", 51.5, 2.5),  # +3%: over the 2% budget
    }
    assert choose(ms, "rmse", Budget()).default == "int8-static"


def test_a_metric_without_a_direction_is_refused() -> None:
    ms = {"fp32": m("fp32", "mystery", 1.0, 1.0), "pruned": m("pruned", "mystery", 1.0, 2.0)}
    with pytest.raises(ValueError, match="no budget rule for metric 'mystery'"):
        choose(ms, "mystery", Budget())


def test_budget_checks_itself() -> None:
    with pytest.raises(ValueError):
        Budget(max_accuracy_drop=-0.1)
    with pytest.raises(ValueError):
        Budget(min_speedup=0.5)
