"""``python -m tests.zoo PATH``: build the test zoo (the one ``zoo_repo`` builds) into PATH, for
``SLIMSERVE_TEST_ZOO=PATH pytest ...`` runs that skip the build."""

from __future__ import annotations

import sys
from pathlib import Path

from export.build import build
from service.core.repository import ModelRepository
from tests.conftest import zoo_options

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.zoo PATH")
    build(ModelRepository(Path(sys.argv[1])), options=zoo_options())
