"""``loadtest/samples.npz`` is what ``export.data`` makes now: the load generators send the rows
the zoo models were evaluated on (rewrite it with ``python -m loadtest.samples``)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest import samples


def test_samples_are_the_current_test_splits() -> None:
    pytest.importorskip("sklearn")
    stored, current = samples.load(), samples.current_splits()
    assert sorted(stored) == sorted(current), "run python -m loadtest.samples"
    for name, x in current.items():
        assert stored[name].dtype == np.float32 and stored[name].shape == x.shape, name
        np.testing.assert_array_equal(
            stored[name], x, err_msg=f"{name}: run python -m loadtest.samples"
        )
