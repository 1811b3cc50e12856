"""The BentoML service: loads the model store and wires the lean app in front; no logic.

Start it with ``python -m service`` (what ``make serve`` runs: slimserve's supervisor and
workers, :mod:`service.server`), or ``bentoml serve service.service:SlimServe`` (BentoML's own
launcher, which a Bento's container runs). Either way the worker's app puts
:class:`service.http.app.HttpApp` (``/v2``, the friendly endpoints, ``/docs.json``, 404s) in
front of BentoML's stack; settings come from ``SLIMSERVE_*`` (service/core/settings.py).
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Literal, cast

import bentoml
from starlette.responses import JSONResponse

from ..core.errors import ModelNotReady, ServingError
from ..core.repository import ModelRepository
from ..core.settings import get_settings
from ..grpc.server import GrpcListener
from ..serving.dataplane import DataPlane
from ..serving.lifecycle import Lifecycle
from ..serving.store import ModelStore
from ..serving.tracing import make_tracer
from . import friendly
from .app import LEAN_PATHS, HttpApp
from .asgi import respond_error
from .outermost import mount_outermost, require_live

__all__ = ["SlimServe"]

_settings = get_settings()

_log = logging.getLogger("slimserve")
if not _log.handlers:  # BentoML configures only its own loggers
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False

#: a friendly endpoint's answer (its OpenAPI schema: a JSON object, pinned by ``output_spec``)
Answer = dict[str, Any]


class ErrorResponse(JSONResponse):
    """``{"error": ...}`` with the error's status and headers, as on /v2 (BentoML's own handler
    would wrap 4xx bodies in a list and hide 5xx messages). Only reached where BentoML's
    internals changed and the friendly routes fell back to BentoML's stack."""

    def __init__(self, exc: ServingError) -> None:
        super().__init__({"error": exc.message}, exc.status_code, headers=exc.headers)


async def _fallback(call: Any) -> Answer | ErrorResponse:
    try:
        result: Answer = await call
        return result
    except ServingError as exc:
        return ErrorResponse(exc)


@bentoml.service(
    name="slimserve",
    workers=_settings.worker_count(),
    http={"host": _settings.host, "port": _settings.port},
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
        lifecycle = Lifecycle(store, _settings)
        lifecycle.start_blocking()  # the start-up load, before the first request
        self.dataplane = DataPlane(store, make_tracer(_settings), lifecycle)
        # BentoML's document of the service (the decorator made SlimServe a bentoml Service)
        self.http = HttpApp(self.dataplane, lambda: cast(Any, SlimServe).openapi_spec.asdict())
        # the v2 gRPC service beside HTTP, on the worker's event loop (SLIMSERVE_GRPC_PORT)
        self.grpc: GrpcListener | None = None
        if _settings.grpc_port:
            grpc = self.grpc = GrpcListener(self.dataplane, self.http.rejections)
            self.dataplane.listeners["grpc"] = lambda: grpc.ready
        # the loaded graphs and sessions live as long as the worker: keep them out of the
        # cyclic GC's full collections (measured: 100-230 ms pauses otherwise)
        gc.freeze()

    @bentoml.on_startup
    async def start(self) -> None:
        """The repository watcher (poll mode), the shared-state watcher and the gRPC server,
        on the worker's event loop; a gRPC port that cannot be bound stops the worker."""
        self.dataplane.lifecycle.ensure_tasks()
        if self.grpc is not None:
            await self.grpc.start()

    @bentoml.on_shutdown
    async def close(self) -> None:
        if self.grpc is not None:  # not ready from here on; RPCs in flight may finish
            await self.grpc.stop()
        self.http.rejections.flush()
        await self.dataplane.close()

    def __is_ready__(self) -> bool:
        """BentoML's ``/readyz``: every listener serves (gRPC too, when it is on)."""
        return all(self.dataplane.listeners_ready().values())

    # The friendly endpoints as BentoML API methods: they give the OpenAPI page its request
    # schemas, and serve where BentoML's internals moved (the lean app serves them otherwise).

    @bentoml.api(route="/classify", input_spec=friendly.ClassifyRequest, output_spec=dict)
    async def classify(
        self,
        model: str,
        rows: list[list[float]] | None = None,
        texts: list[str] | None = None,
        truncate: bool = False,
        top_k: int = 1,
    ) -> Answer | ErrorResponse:
        """Labels and probabilities for each row (or text, for text classifiers), best first."""
        return await _fallback(
            friendly.classify(self.dataplane, model, rows, top_k, None, texts, truncate)
        )

    @bentoml.api(route="/embed", input_spec=friendly.EmbedRequest, output_spec=dict)
    async def embed(
        self, model: str, texts: list[str], truncate: bool = False
    ) -> Answer | ErrorResponse:
        """One embedding per text (text-minilm: 384 numbers of unit norm)."""
        return await _fallback(friendly.embed(self.dataplane, model, texts, truncate))

    @bentoml.api(route="/forecast", input_spec=friendly.ForecastRequest, output_spec=dict)
    async def forecast(
        self,
        model: str,
        history: list[float] | list[list[float]],
        horizon: int | None = None,
    ) -> Answer | ErrorResponse:
        """The next values of a series (or of several of one length), in its own units."""
        return await _fallback(friendly.forecast(self.dataplane, model, history, horizon))

    @bentoml.api(route="/regress", input_spec=friendly.RowsRequest, output_spec=dict)
    async def regress(self, model: str, rows: list[list[float]]) -> Answer | ErrorResponse:
        """One predicted value per row, in the target's units."""
        return await _fallback(friendly.regress(self.dataplane, model, rows))

    @bentoml.api(route="/transform", input_spec=friendly.RowsRequest, output_spec=dict)
    async def transform(self, model: str, rows: list[list[float]]) -> Answer | ErrorResponse:
        """Embeddings (PCA, VAE encoder, autoencoder) or cluster assignments, per row."""
        return await _fallback(friendly.transform(self.dataplane, model, rows))

    @bentoml.api(route="/generate", input_spec=friendly.GenerateRequest, output_spec=dict)
    async def generate(
        self,
        model: str,
        n: int = 1,
        seed: int = 0,
        labels: list[int] | None = None,
        format: Literal["array", "png"] = "array",
        scale: int = 8,
    ) -> Answer | ErrorResponse:
        """Seeded samples: arrays in [0, 1], or base64 PNG images."""
        return await _fallback(
            friendly.generate(self.dataplane, model, n, seed, labels, format, scale)
        )


async def _lean(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Hand lean requests to the worker's service instance (created during lifespan startup)."""
    service = bentoml.get_current_service()
    if service is None:  # only possible before BentoML finished starting the worker
        error = ModelNotReady("the server is still loading models", _settings.retry_after_s)
        return await respond_error(send, error)
    await service.http(scope, receive, send)


mount_outermost(SlimServe, _lean, "/v2", LEAN_PATHS)
