"""The dataplane: what every transport asks of the server, answered once.

MLServer's ``DataPlane`` is the model: the v2 REST app, the friendly JSON endpoints and later
gRPC and the Ray Serve replica are thin codecs around this module. A request's whole path reads
top to bottom in :meth:`DataPlane.infer`:

    resolve the model -> decode (the transport's codec) -> pick the variant the request names
    -> choose outputs -> validate -> batch -> onnxruntime -> encode (the transport's codec)

and every request metric is observed here, whichever transport the request came by.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import numpy as np

from ..core.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    ServingError,
)
from ..core.protocol import InferRequest, RequestedOutput, select_outputs, validate_inputs
from ..core.tokenizer import TEXT_INPUT, truncation
from .lifecycle import Lifecycle
from .metrics import metrics
from .sequences import infer_texts
from .store import LoadedModel, ModelStore, index
from .tracing import Call
from .traffic import Shadows

__all__ = ["DataPlane", "Inference", "Decode", "Encode", "Call", "PLATFORM", "EXTENSIONS"]

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_OUTCOMES: list[tuple[type[ServingError], str]] = [
    (InvalidInput, "invalid_input"),
    (ModelNotFound, "not_found"),
    (PayloadTooLarge, "too_large"),
    (ModelNotReady, "not_ready"),
    (ModelUnavailable, "unavailable"),
    (Overloaded, "overloaded"),
    (DeadlineExceeded, "overloaded"),
    (ClientClosedRequest, "client_gone"),
]

T = TypeVar("T")


@dataclass(slots=True, frozen=True)
class Inference:
    """A request that ran: the variant that served it, the request, the outputs to send back
    (in order) and every output's values by name."""

    model: LoadedModel
    request: InferRequest
    outputs: list[RequestedOutput]
    values: dict[str, np.ndarray]
    samples: int = 1
    #: a text model's token ids, for a shadow copy (the graph does not take the request's
    #: tensors then)
    tokens: list[list[int]] | None = None


#: a transport's decoder: the resolved model in, the request's tensors out (a v2 body is read
#: only once the model is known to exist and be ready)
Decode = Callable[[LoadedModel], Awaitable[InferRequest]]
#: a transport's encoder: the result in its wire format
Encode = Callable[[Inference], T]


def _version() -> str:
    try:
        return metadata.version("slimserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class DataPlane:
    """Server and model metadata, health, the repository index, and inference."""

    def __init__(
        self, store: ModelStore, tracer: Any = None, lifecycle: Lifecycle | None = None
    ) -> None:
        self.store = store
        self.settings = store.settings
        self.tracer = tracer  # an OpenTelemetry tracer, or None: tracing off
        self.lifecycle = lifecycle or Lifecycle(store, store.settings)
        timeout = self.settings.request_timeout_s
        self.shadows = Shadows(store, self.settings.shadow_max_pending, timeout)
        #: the listeners besides the HTTP one that answers health (the gRPC server): name ->
        #: whether it serves now; the server is ready only while every one does
        self.listeners: dict[str, Callable[[], bool]] = {}

    # ---------------------------------------------------------------- inference, top to bottom

    async def infer(
        self,
        name: str,
        version: str | None,
        decode: Decode,
        encode: Encode[T],
        call: Call | None = None,
    ) -> T:
        """Run ``name`` (``name@variant``; ``version`` when the client names one) on the
        request ``decode`` produces, and return ``encode``'s answer. Errors are
        :class:`ServingError` with their status; each request is counted once, by outcome.
        ``call`` carries what the transport knows: whether the client hung up (its queued
        work is then dropped) and the trace context (a span when tracing is on)."""
        start = time.perf_counter()
        span = self._span(name, call) if self.tracer is not None and call is not None else None
        model: LoadedModel | None = None
        try:
            model = await self.store.acquire(name, version)  # a canary may take it
            meters, owner, batcher = model.meters, model.owner, model.batcher
            assert meters is not None and owner is not None and batcher is not None
            batcher.check_room(self.settings.request_timeout_s)  # shed before decoding
            meters.in_flight.inc()
            owner.in_flight += 1  # the version stays open while a request uses it
            owner.last_used = start
            try:
                request = await decode(model)
                asked = request.parameters.get("variant")
                if asked is not None:  # v2 parameter: another variant of the same version
                    model = self.store.resolve(name, version, asked)
                    if model.owner is not owner and model.owner is not None:
                        owner.in_flight -= 1
                        owner = model.owner
                        owner.in_flight += 1
                done = await self._run(model, request, call)
            finally:
                owner.in_flight -= 1
                meters.in_flight.dec()
            answer = encode(done)
        except ServingError as exc:
            outcome = next((o for t, o in _OUTCOMES if isinstance(exc, t)), "error")
            self._count(name, model, outcome, span, call)
            raise
        except asyncio.CancelledError:  # the transport cancelled it: its client is gone
            self._count(name, model, "client_gone", span, call)
            raise
        except Exception:
            self._count(name, model, "error", span, call)
            raise
        meters = model.meters
        assert meters is not None
        protocol = call.protocol if call is not None else "http"
        meters.success[protocol].inc()
        meters.duration[protocol].observe(time.perf_counter() - start)
        if span is not None:
            self._end_span(span, call, model.labels, "success")
        self.shadows.offer(done.model, done.request.inputs, done.samples, done.values, done.tokens)
        return answer

    def _count(
        self, name: str, model: LoadedModel | None, outcome: str, span: Any, call: Call | None
    ) -> None:
        """A request that did not succeed, counted by outcome (and its span ended)."""
        labels = model.labels if model is not None else self.store.labels(name)
        protocol = call.protocol if call is not None else "http"
        if model is not None and model.meters is not None:
            model.meters.outcome(outcome, protocol).inc()
        else:
            metrics().requests.labels(*labels, outcome, protocol).inc()
        if span is not None:
            self._end_span(span, call, labels, outcome)

    async def _run(self, model: LoadedModel, request: InferRequest, call: Call | None) -> Inference:
        """validate -> batch -> onnxruntime: the one way every transport runs a model."""
        session, batcher = model.session, model.batcher
        assert session is not None and batcher is not None  # resolve() returns ready models
        wanted = select_outputs(request, session.output_names, model.name)
        samples = validate_inputs(request, model.inputs, model.name)
        timeout = self.settings.request_timeout_s
        gone, timings = (call.gone, call.timings) if call is not None else (None, None)
        traces = timings if self.tracer else None
        tokens = None
        if model.text is not None:
            outputs, tokens = await infer_texts(
                model.text,
                batcher,
                request.inputs[TEXT_INPUT],
                truncation(request.parameters, model.name),
                self.settings.sequence_batching,
                timeout,
                gone,
                traces,
            )
        else:
            outputs = await batcher.infer(request.inputs, samples, timeout, gone, traces)
        values = dict(zip(session.output_names, outputs, strict=True))
        return Inference(model, request, wanted, values, samples, tokens)

    # ---------------------------------------------------------------- tracing (when on)

    def _span(self, name: str, call: Call) -> Any:
        """The request's span, continuing the client's ``traceparent``; its trace id goes
        into ``call`` for the response header and the log."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {"traceparent": call.traceparent} if call.traceparent else {}
        parent = TraceContextTextMapPropagator().extract(carrier)
        span = self.tracer.start_span("infer", context=parent, kind=trace.SpanKind.SERVER)
        call.trace_id = format(span.get_span_context().trace_id, "032x")
        return span

    def _end_span(
        self, span: Any, call: Call | None, labels: tuple[str, ...], outcome: str
    ) -> None:
        """Queue wait and onnxruntime run as child spans (from the batcher's timings)."""
        from opentelemetry import trace

        span.set_attributes(
            {"model": labels[0], "model.version": labels[1], "model.variant": labels[2]}
        )
        span.set_attribute("outcome", outcome)
        if outcome != "success":
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        context = trace.set_span_in_context(span)
        for t in call.timings if call is not None else []:
            if t.batched:
                queue = self.tracer.start_span("queue", context=context, start_time=t.enqueued)
                queue.end(end_time=t.batched)
            if t.run_end:
                run = self.tracer.start_span(
                    "onnxruntime.run",
                    context=context,
                    start_time=t.run_start,
                    attributes={"batch.samples": t.batch_samples},
                )
                run.end(end_time=t.run_end)
        span.end()

    # ---------------------------------------------------------------- metadata and health

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "slimserve", "version": _version(), "extensions": EXTENSIONS}

    def not_ready(self) -> dict[str, str]:
        """Every model that does not serve, with the reason."""
        return {n: m.error or "" for n, m in self.store.models.items() if not m.ready}

    def listeners_ready(self) -> dict[str, bool]:
        return {name: serving() for name, serving in self.listeners.items()}

    def server_ready(self) -> bool:
        """Ready while every listener serves and at least one model does (the others are
        reported with reasons)."""
        if not all(self.listeners_ready().values()):
            return False
        return any(e.primary() is not None for e in self.store.entries.values())

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.store.resolve(name, version).ready

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """v2 model metadata, plus which variant this is, the others with their offline
        figures, the versions serving, the traffic policy with the shadow's live agreement,
        and the compression card."""
        model = self.store.resolve(name, version)
        assert model.session is not None and model.manifest is not None
        manifest = model.manifest
        entry = self.store.entries[model.name]
        variants = {}
        for variant, spec in manifest.variants.items():
            measured = spec.details.get("measurement") or {}
            variants[variant] = {
                "served": variant in model.siblings,
                "reason": model.unservable.get(variant),
                "metrics": measured.get("metrics"),
                "speedup": measured.get("speedup"),
                "size_bytes": measured.get("size_bytes"),
                "parameters": measured.get("parameters"),
            }
        shadow = self.shadows.stats.get(model.name)
        return {
            "name": model.name,
            "versions": [str(v) for v in entry.serving],
            "platform": PLATFORM,
            "inputs": [t.to_dict() for t in model.inputs],
            "outputs": [t.to_dict() for t in model.session.outputs],
            "parameters": {
                "version": str(model.version),
                "variant": model.variant,
                "default_variant": manifest.default_variant,
                "provider": model.session.provider,
                "variants": variants,
                "selection": manifest.selection.get("reason"),
                "version_policy": entry.policy.describe(),
                "traffic": entry.traffic.model_dump() if entry.traffic else None,
                "shadow": shadow.as_dict() if shadow is not None else None,
                "card": model.card,
            },
        }

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository extension's index (see :func:`service.serving.store.index`)."""
        return index(self.store, ready_only)

    async def close(self) -> None:
        await self.shadows.close()
        await self.lifecycle.close()
        await self.store.close()
