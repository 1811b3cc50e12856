"""The BentoML service: loads the model store and wires the lean /v2 app in front; no logic.

Start it with ``python -m service`` (what ``make serve`` runs), or ``bentoml serve
service.service:SlimServe``; settings come from ``SLIMSERVE_*`` (service/core/settings.py).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

import bentoml
from pydantic import Field
from starlette.responses import JSONResponse

from ..core.errors import ModelNotReady, ServingError
from ..core.repository import ModelRepository
from ..core.settings import get_settings
from ..serving.dataplane import DataPlane
from ..serving.store import ModelStore
from . import friendly
from .outermost import mount_outermost, require_live
from .v2 import V2App, respond_error

__all__ = ["SlimServe"]

_settings = get_settings()

_log = logging.getLogger("slimserve")
if not _log.handlers:  # BentoML configures only its own loggers
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


class _ClientErrorsInOneLine(logging.Filter):
    """BentoML logs a request that fails its pydantic input schema as an ERROR with a
    traceback; a client's mistake is one WARNING line here."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "ValidationError":
            record.msg = f"{record.getMessage()}: invalid input: {str(exc).splitlines()[0]}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsInOneLine())

Rows = Annotated[
    list[list[float]],
    Field(
        description="One list of numbers per sample, after the preprocessing in the model's "
        "manifest (digits: pixels / 16, 64 per row)."
    ),
]
ModelName = Annotated[str, Field(description="A model of the repository, e.g. digits-cnn.")]


#: a friendly endpoint's answer (its OpenAPI schema: a JSON object, pinned by ``output_spec``)
Answer = dict[str, Any]


class ErrorResponse(JSONResponse):
    """``{"error": ...}`` with the error's status and headers, as on /v2 (BentoML's own handler
    would wrap 4xx bodies in a list and hide 5xx messages)."""

    def __init__(self, exc: ServingError) -> None:
        super().__init__({"error": exc.message}, exc.status_code, headers=exc.headers)


async def _friendly(call: Awaitable[Answer]) -> Answer | ErrorResponse:
    try:
        return await call
    except ServingError as exc:
        _log.warning("%d %s", exc.status_code, exc.message)
        return ErrorResponse(exc)


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
        # the worker built its ASGI app before creating this instance: /v2 must be routed
        require_live("slimserve")
        store = ModelStore(ModelRepository(_settings.model_repository), _settings)
        store.load_all()
        self.dataplane = DataPlane(store)
        self.v2 = V2App(self.dataplane)
        # the loaded graphs and sessions live as long as the worker: keep them out of the
        # cyclic GC's full collections (measured: 100-230 ms pauses otherwise)
        gc.freeze()

    @bentoml.on_shutdown
    async def close(self) -> None:
        await self.dataplane.close()

    @bentoml.api(route="/classify", output_spec=dict)
    async def classify(
        self, model: ModelName, rows: Rows, top_k: Annotated[int, Field(ge=1, le=100)] = 1
    ) -> Answer | ErrorResponse:
        """Labels and probabilities for each row, best first."""
        return await _friendly(friendly.classify(self.dataplane, model, rows, top_k))

    @bentoml.api(route="/regress", output_spec=dict)
    async def regress(self, model: ModelName, rows: Rows) -> Answer | ErrorResponse:
        """One predicted value per row, in the target's units."""
        return await _friendly(friendly.regress(self.dataplane, model, rows))

    @bentoml.api(route="/transform", output_spec=dict)
    async def transform(self, model: ModelName, rows: Rows) -> Answer | ErrorResponse:
        """Embeddings (PCA, VAE encoder, autoencoder) or cluster assignments, per row."""
        return await _friendly(friendly.transform(self.dataplane, model, rows))

    @bentoml.api(route="/generate", output_spec=dict)
    async def generate(
        self,
        model: ModelName,
        n: Annotated[int, Field(ge=1, le=friendly.MAX_GENERATE)] = 1,
        seed: int = 0,
        labels: Annotated[
            list[int] | None, Field(description="Digit per sample, for conditional generators.")
        ] = None,
        format: Literal["array", "png"] = "array",
        scale: Annotated[int, Field(ge=1, le=32, description="PNG pixel size.")] = 8,
    ) -> Answer | ErrorResponse:
        """Seeded samples: arrays in [0, 1], or base64 PNG images."""
        return await _friendly(
            friendly.generate(self.dataplane, model, n, seed, labels, format, scale)
        )


async def _v2(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Hand /v2 requests to the worker's service instance (created during lifespan startup)."""
    service = bentoml.get_current_service()
    if service is None:  # only possible before BentoML finished starting the worker
        error = ModelNotReady("the server is still loading models", _settings.retry_after_s)
        return await respond_error(send, error)
    await service.v2(scope, receive, send)


mount_outermost(SlimServe, _v2, "/v2")
