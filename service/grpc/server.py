"""The v2 gRPC service (``inference.GRPCInferenceService``) over the dataplane.

What Triton and KServe serve on port 8001, so ``tritonclient.grpc`` (and KServe's client) work
unchanged: health, server and model metadata, ModelInfer (typed or raw tensors), the
repository extension, ModelStatistics and ModelConfig. Every RPC is a few lines over
:class:`service.serving.dataplane.DataPlane`: the same model store, batcher, limits, metrics
(``protocol="grpc"``) and traces as ``/v2`` over HTTP. The stubs are those the pinned
``tritonclient[grpc]`` wheel ships (see README, gRPC): the wire names ``tritonclient`` speaks,
with no generated code kept here.

Errors are gRPC status codes the way Triton maps them (:data:`STATUS`), with the messages
the HTTP API gives; a 503's ``Retry-After`` travels as ``retry-after`` and gRPC's own
``grpc-retry-pushback-ms`` trailing metadata. A message over ``SLIMSERVE_MAX_BODY_BYTES``
is refused by the transport with RESOURCE_EXHAUSTED before it is read.

:class:`GrpcListener` starts and stops the server with the BentoML worker
(:mod:`service.http.bento`), on slimserve's own HTTP/2 transport (:mod:`service.grpc.calls`)
or grpcio's ``grpc.aio`` (``SLIMSERVE_GRPC_SERVER``); every worker binds the port with
``SO_REUSEPORT`` and the kernel spreads connections between them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..core.errors import (
    ClientClosedRequest,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    PayloadTooLarge,
    ServingError,
    Unavailable,
)
from ..core.logs import RejectionLog, clip
from ..core.protocol import InferRequest
from ..serving.dataplane import DataPlane
from ..serving.metrics import statistics
from ..serving.store import LoadedModel
from ..serving.tracing import Call
from .calls import Method, listener
from .codec import decode_infer, encode_infer, model_config, parameters
from .h2 import Limits

__all__ = ["InferenceServicer", "GrpcListener", "STATUS", "status_of", "address", "methods"]

log = logging.getLogger("slimserve.grpc")

#: error class -> status code; the first match wins (subclasses first)
STATUS: list[tuple[type[ServingError], grpc.StatusCode]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),  # loading, queue full, deadline: retry later
    # in the repository but failed to load: no retry helps until it is fixed (HTTP: 400)
    (ModelUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (ClientClosedRequest, grpc.StatusCode.CANCELLED),
]
_UNSUPPORTED = (
    "slimserve does not serve {what}; send tensors in the request itself "
    "(typed contents or raw_input_contents)"
)


def status_of(exc: ServingError) -> grpc.StatusCode:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


def _unimplemented(message: str) -> Any:
    """An RPC slimserve does not serve: UNIMPLEMENTED, with what to do instead."""

    async def rpc(self: Any, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return rpc


def address(host: str, port: int) -> str:
    """``host:port`` as gRPC reads it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs; each turns a :class:`ServingError` into its status code and message."""

    def __init__(self, dataplane: DataPlane, rejections: RejectionLog | None = None) -> None:
        self.dataplane = dataplane
        self.rejections = rejections or RejectionLog(log)
        self.traced = dataplane.tracer is not None
        metadata = dataplane.server_metadata()
        self.server_metadata = pb.ServerMetadataResponse(**metadata)

    async def _abort(
        self, context: Any, exc: Exception, rpc: str, call: Call | None = None
    ) -> None:
        """End the RPC with ``exc``'s status and message (logged as the HTTP app logs)."""
        if not isinstance(exc, ServingError):
            log.error("gRPC %s failed", rpc, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal server error")
            return
        code = status_of(exc)
        where = f"gRPC {rpc}"
        if call is not None and call.trace_id is not None:
            where = f"{where} trace_id={call.trace_id}"
        self.rejections.rejected(exc.status_code, where, exc.message)
        trailers: list[tuple[str, str]] = []
        if isinstance(exc, Unavailable):
            retry = exc.retry_after_s
            trailers += [("retry-after", str(retry)), ("grpc-retry-pushback-ms", str(retry * 1000))]
        if call is not None and call.trace_id is not None:
            trailers.append(("x-trace-id", call.trace_id))
        await context.abort(code, exc.message, tuple(trailers))

    # ------------------------------------------------------------------ health and metadata

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.dataplane.server_ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            ready = self.dataplane.model_ready(request.name, request.version or None)
        except (Unavailable, ModelUnavailable):  # known, not serving: not ready
            ready = False
        except ServingError as exc:
            await self._abort(context, exc, "ModelReady")
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self.server_metadata

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            doc = self.dataplane.model_metadata(request.name, request.version or None)
        except ServingError as exc:
            await self._abort(context, exc, "ModelMetadata")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=[tensor(**t) for t in doc["inputs"]],
            outputs=[tensor(**t) for t in doc["outputs"]],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            model = self.dataplane.store.resolve(request.name, request.version or None)
        except ServingError as exc:
            await self._abort(context, exc, "ModelConfig")
        batcher, session = model.batcher, model.session
        assert batcher is not None and session is not None
        config = model_config(
            model.name,
            model.inputs,
            session.outputs,
            batcher.max_batch_size,
            batcher.max_queue_delay_s * 1000,
        )
        return pb.ModelConfigResponse(config=config)

    # ------------------------------------------------------------------ inference

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        call = Call(protocol="grpc")
        if self.traced:
            call.traceparent = dict(context.invocation_metadata() or ()).get("traceparent")
        try:
            return await self._infer(request, call)
        except Exception as exc:
            await self._abort(context, exc, "ModelInfer", call)

    async def _infer(self, request: Any, call: Call) -> Any:
        async def decode(model: LoadedModel) -> InferRequest:
            return decode_infer(request, model.expected)

        version = request.model_version or None
        return await self.dataplane.infer(request.model_name, version, decode, encode_infer, call)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Triton's streaming inference: requests run concurrently (they batch with each
        other and with everyone else's) and each answer, or its error, is sent as it is
        ready, tagged with its request's ``id``."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: Any) -> None:
            try:
                response = await self._infer(request, Call(protocol="grpc"))
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                if isinstance(exc, ServingError):
                    message = exc.message
                    self.rejections.rejected(exc.status_code, "gRPC ModelStreamInfer", message)
                else:
                    log.error("gRPC ModelStreamInfer failed", exc_info=exc)
                    message = "internal server error"
                echo = pb.ModelInferResponse(
                    model_name=request.model_name,
                    model_version=request.model_version,
                    id=request.id,
                )
                await answers.put(
                    pb.ModelStreamInferResponse(error_message=message, infer_response=echo)
                )

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*list(running))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # a broken request stream ends the RPC with its error
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # ------------------------------------------------------------------ repository extension

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        rows = self.dataplane.repository_index(request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(**row) for row in rows])

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        try:
            self._no_overrides(request, "load")
            await self.dataplane.lifecycle.api_load(request.model_name)
        except ServingError as exc:
            await self._abort(context, exc, "RepositoryModelLoad")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        try:
            self._no_overrides(request, "unload")
            await self.dataplane.lifecycle.api_unload(request.model_name)
        except ServingError as exc:
            await self._abort(context, exc, "RepositoryModelUnload")
        return pb.RepositoryModelUnloadResponse()

    @staticmethod
    def _no_overrides(request: Any, what: str) -> None:
        """slimserve loads what the repository holds: Triton's ``config`` and ``file:``
        overrides (and any other parameter) are refused rather than ignored. Unload's
        ``unload_dependents`` (tritonclient always sends it) is accepted: no model here has
        dependents (no ensembles)."""
        given = parameters(request.parameters, f"repository {what}")
        given.pop("unload_dependents", None)
        if given:
            raise InvalidInput(
                f"repository {what} of {clip(request.model_name, 64)!r}: parameters "
                f"{sorted(given)[:4]} are not supported; slimserve {what}s the model as its "
                "repository folder holds it"
            )

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """Per model version, summed over its variants, both protocols and every worker (the
        series of ``/metrics``). ``queue`` counts requests' waits; ``compute_infer`` counts
        onnxruntime runs (batches), so its count is ``execution_count``."""
        try:
            if request.name:
                self.dataplane.store.resolve(request.name, request.version or None)
        except (Unavailable, ModelUnavailable):
            pass  # known but not serving now: its past figures still stand
        except ServingError as exc:
            await self._abort(context, exc, "ModelStatistics")

        def duration(row: dict[str, float], key: str) -> Any:
            """``key``'s count and, where it is timed (``key_s``), its nanoseconds."""
            ns = int(row.get(f"{key}_s", 0) * 1e9)
            return pb.StatisticDuration(count=int(row.get(key, 0)), ns=ns)

        found = []
        for (name, version), row in sorted(statistics().items()):
            if request.name and name != request.name.partition("@")[0]:
                continue
            if request.version and version != request.version:
                continue
            found.append(
                pb.ModelStatistics(
                    name=name,
                    version=version,
                    inference_count=int(row.get("samples", 0)),
                    execution_count=int(row.get("executions", 0)),
                    inference_stats=pb.InferStatistics(
                        success=duration(row, "success"),
                        fail=duration(row, "fail"),
                        queue=duration(row, "queue"),
                        compute_infer=duration(row, "compute"),
                    ),
                )
            )
        return pb.ModelStatisticsResponse(model_stats=found)

    # ------------------------------------------------------------------ not served

    SystemSharedMemoryStatus = SystemSharedMemoryRegister = SystemSharedMemoryUnregister = (
        _unimplemented(_UNSUPPORTED.format(what="system shared memory"))
    )
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _unimplemented(
        _UNSUPPORTED.format(what="CUDA shared memory")
    )
    TraceSetting = _unimplemented(
        "slimserve traces with OpenTelemetry, set by OTEL_* variables at start; "
        "TraceSetting changes nothing here"
    )
    LogSettings = _unimplemented(
        "slimserve's log settings are not changed at run time; LogSettings changes nothing here"
    )


def methods(servicer: InferenceServicer) -> dict[str, Method]:
    """The service's RPCs by path, as :mod:`service.grpc.h2` dispatches them."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    table = {}
    for rpc in service.methods:
        assert rpc.client_streaming == rpc.server_streaming, rpc.full_name  # unary or bidi
        table[f"/{service.full_name}/{rpc.name}"] = Method(
            getattr(servicer, rpc.name), getattr(pb, rpc.input_type.name), rpc.server_streaming
        )
    return table


class GrpcListener:
    """The gRPC server of one worker, on its event loop; ``ready`` while it serves.
    ``SLIMSERVE_GRPC_SERVER`` picks the transport: slimserve's own (:mod:`service.grpc.h2`)
    or grpcio's ``grpc.aio``; the servicer is the same."""

    def __init__(self, dataplane: DataPlane, rejections: RejectionLog) -> None:
        self.dataplane = dataplane
        self.settings = dataplane.settings
        self.rejections = rejections
        self.server: Any = None

    @property
    def ready(self) -> bool:
        return self.server is not None

    async def start(self) -> None:
        """Bind ``SLIMSERVE_HOST:SLIMSERVE_GRPC_PORT`` and serve; raises when it cannot."""
        settings = self.settings
        servicer = InferenceServicer(self.dataplane, self.rejections)
        where = address(settings.host, settings.grpc_port)
        if settings.grpc_server == "slimserve":
            ours = listener(methods(servicer), Limits(max_message=settings.max_body_bytes))
            try:
                await ours.start(settings.host, settings.grpc_port)
            except OSError as exc:
                raise RuntimeError(
                    f"cannot listen for gRPC on {where}: {exc.strerror or exc}; "
                    "SLIMSERVE_GRPC_PORT picks another port, 0 turns gRPC off"
                ) from None
            self.server = ours
            log.info("gRPC (inference.GRPCInferenceService) on %s", where)
            return
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 1),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        try:
            server.add_insecure_port(where)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cannot listen for gRPC on {where}: {exc}; SLIMSERVE_GRPC_PORT picks another "
                "port, 0 turns gRPC off"
            ) from None
        await server.start()
        self.server = server
        log.info("gRPC (inference.GRPCInferenceService) on %s", where)

    async def stop(self) -> None:
        """Refuse new RPCs, give those in flight the graceful-shutdown time, then stop."""
        server, self.server = self.server, None
        if server is not None:
            await server.stop(self.settings.graceful_shutdown_s)
