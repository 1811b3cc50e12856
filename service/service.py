"""The BentoML service: loads the model store and wires the lean /v2 app in front; no logic.

Start it with ``python -m service`` (what ``make serve`` runs), or ``bentoml serve
service.service:SlimServe``; settings come from ``SLIMSERVE_*`` (service/settings.py).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import bentoml

from .errors import ModelNotReady
from .models import ModelStore
from .outermost import mount_outermost
from .protocol import dumps
from .repository import ModelRepository
from .settings import get_settings
from .v2 import V2App

__all__ = ["SlimServe"]

_settings = get_settings()

_log = logging.getLogger("slimserve")
if not _log.handlers:  # BentoML configures only its own loggers
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


@bentoml.service(
    name="slimserve",
    workers=_settings.workers,
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/v2/"]},
    traffic={"timeout": max(30, int(_settings.request_timeout_s * 2))},
)
class SlimServe:
    """Every model of the repository on onnxruntime, over the Open Inference Protocol v2."""

    def __init__(self) -> None:
        self.store = ModelStore(ModelRepository(_settings.model_repository), _settings)
        self.store.load_all()
        self.v2 = V2App(self.store)
        # the loaded graphs and sessions live as long as the worker: keep them out of the
        # cyclic GC's full collections (measured: 100-230 ms pauses otherwise)
        gc.freeze()

    @bentoml.on_shutdown
    async def close(self) -> None:
        await self.store.close()


async def _v2(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Hand /v2 requests to the worker's service instance (created during lifespan startup)."""
    service = bentoml.get_current_service()
    if service is None:  # only possible before BentoML finished starting the worker
        error = ModelNotReady("the server is still loading models", _settings.retry_after_s)
        body = dumps({"error": error.message})
        headers = [
            (b"content-type", b"application/json"),
            (b"retry-after", b"1"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await service.v2(scope, receive, send)


mount_outermost(SlimServe, _v2, "/v2")
