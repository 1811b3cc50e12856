"""SLIMSERVE_WORKERS: a number, or auto; and the onnxruntime threads each worker gets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core import settings as settings_module
from service.core.settings import Settings


@pytest.fixture
def cpus(monkeypatch: pytest.MonkeyPatch):
    def set_cpus(n: int) -> None:
        monkeypatch.setattr(settings_module, "usable_cpus", lambda: n)

    return set_cpus


@pytest.mark.parametrize(
    ("n", "workers", "threads"), [(1, 1, 0), (2, 1, 0), (3, 1, 0), (4, 2, 2), (16, 8, 2)]
)
def test_auto_runs_a_worker_per_two_cpus_with_the_cpus_divided(cpus, n, workers, threads) -> None:
    cpus(n)
    s = Settings(workers="auto")
    assert (s.worker_count(), s.session_threads()) == (workers, threads)


def test_auto_is_read_from_the_environment(cpus, monkeypatch: pytest.MonkeyPatch) -> None:
    cpus(8)
    monkeypatch.setenv("SLIMSERVE_WORKERS", "auto")
    assert Settings().worker_count() == 4


def test_a_number_of_workers_divides_the_cpus_unless_threads_are_set(cpus) -> None:
    cpus(6)
    assert Settings(workers=1).session_threads() == 0  # onnxruntime decides
    assert Settings(workers=3).session_threads() == 2
    assert Settings(workers=8).session_threads() == 1  # never 0 with several workers
    assert Settings(workers=3, intra_op_threads=4).session_threads() == 4


@pytest.mark.parametrize("bad", ["0", "-1", "many", "1.5"])
def test_a_bad_worker_setting_is_refused_with_its_value(bad, monkeypatch) -> None:
    monkeypatch.setenv("SLIMSERVE_WORKERS", bad)
    with pytest.raises(ValidationError, match="workers"):
        Settings()
