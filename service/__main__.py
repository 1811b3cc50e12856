"""``python -m service``: start ``bentoml serve`` with host, port and workers from settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from service.core.settings import get_settings


def main() -> None:
    settings = get_settings()
    bentoml = Path(sys.executable).with_name("bentoml")
    argv = [
        str(bentoml),
        "serve",
        "service.service:SlimServe",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
    ]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}  # no outbound usage tracking
    os.execve(str(bentoml), argv, env)


if __name__ == "__main__":
    main()
