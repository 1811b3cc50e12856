from __future__ import annotations

import pytest

from export import sklearn_zoo, torch_zoo, zoo


def test_every_trainer_is_in_the_zoo_once() -> None:
    assert set(zoo.SPECS) == set(torch_zoo.TRAINERS) | set(sklearn_zoo.TRAINERS)
    assert not set(torch_zoo.TRAINERS) & set(sklearn_zoo.TRAINERS)


def test_zoo_covers_every_task_family() -> None:
    tasks = {s.task for s in zoo.SPECS.values()}
    assert {
        "regression",
        "classification",
        "generation",
        "clustering",
        "dimensionality_reduction",
        "embedding",
        "forecasting",
    } <= tasks
    datasets = {s.dataset for s in zoo.SPECS.values()}
    assert datasets == {
        "digits",
        "diabetes",
        "breast-cancer",
        "iris",
        "wine",
        "20newsgroups",
        "sunspots",
    }


def test_plan_puts_requirements_first_without_duplicates() -> None:
    names = [s.name for s in zoo.plan(["digits-gan", "digits-vae-decoder", "digits-cnn"])]
    assert names == ["digits-cnn", "digits-gan", "digits-vae-decoder"]
    full = [s.name for s in zoo.plan()]
    assert len(full) == len(set(full)) == len(zoo.SPECS)
    assert full.index("digits-cnn") < full.index("digits-gan")


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(
        KeyError, match=r"model 'digits-rnn' is not in the zoo; known models: .*digits-cnn"
    ):
        zoo.plan(["digits-rnn"])
