"""The baselines cards are read against: exact on series built to know the answer, and the
TF-IDF classifier at its known accuracy on 20 Newsgroups."""

from __future__ import annotations

import numpy as np
import pytest

from export import baselines
from export.corpora import text_corpus


def test_naive_on_a_ramp_is_off_by_the_slope_times_the_mean_step() -> None:
    ramp = np.arange(100, dtype=float) * 2.0
    # from each origin, step h is (h + 1) slopes away from the last value seen
    assert baselines.naive_mae(ramp, 80, 3) == pytest.approx(2.0 * (1 + 2 + 3) / 3)
    assert baselines.naive_mae(ramp, 80, 1) == pytest.approx(2.0)


def test_seasonal_naive_is_exact_on_a_periodic_series_and_naive_is_not() -> None:
    t = np.arange(240)
    series = 10 + 5 * np.sin(2 * np.pi * t / 12)
    assert baselines.seasonal_naive_mae(series, 200, 18, season=12) == pytest.approx(0.0, abs=1e-9)
    assert baselines.naive_mae(series, 200, 18) > 1.0
    assert baselines.seasonal_naive_mae(series, 200, 5, season=1) == pytest.approx(
        baselines.naive_mae(series, 200, 5)
    )


def test_origins_cover_the_tail_and_bad_windows_are_refused() -> None:
    assert list(baselines.forecast_origins(10, 6, 2)) == [6, 7, 8]
    with pytest.raises(ValueError, match="test_start"):
        baselines.forecast_origins(10, 10, 2)
    with pytest.raises(ValueError, match="history"):
        baselines.seasonal_naive_mae(np.arange(30.0), 5, 2, season=12)


@pytest.mark.slow
def test_tfidf_logistic_regression_on_20_newsgroups() -> None:
    train, test = text_corpus("20newsgroups", "train"), text_corpus("20newsgroups", "test")
    result = baselines.tfidf_logistic(train, test)
    assert 0.83 <= result["accuracy"] <= 0.87  # 0.845 measured
    assert result["macro_f1"] > 0.8 and result["vocabulary"] > 30000
