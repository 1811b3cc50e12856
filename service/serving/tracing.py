"""OpenTelemetry spans for inference: one per request, with its queue wait and its
onnxruntime run as children; off unless the OTel environment asks for them.

/v2 and the friendly endpoints run ahead of BentoML's middleware, so BentoML's own tracing
never sees them; the dataplane traces them here. A request's span continues the W3C
``traceparent`` it came with; its trace id goes back in the ``X-Trace-Id`` header and into
log lines. Spans are exported with the OTel SDK (``OTEL_TRACES_EXPORTER=otlp`` or an
``OTEL_EXPORTER_OTLP_ENDPOINT``: OTLP over HTTP; ``console``: standard output). With tracing
off nothing here runs on the request path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.settings import Settings

__all__ = ["Call", "Trace", "make_tracer", "TRACE_ID_HEADER"]

TRACE_ID_HEADER = "x-trace-id"


@dataclass(slots=True)
class Trace:
    """When one request's samples waited and ran (ns since the epoch), filled by the batcher."""

    enqueued: int = 0
    batched: int = 0
    run_start: int = 0
    run_end: int = 0
    batch_samples: int = 0


@dataclass(slots=True)
class Call:
    """What a transport knows of a request besides its body: the protocol it came by (the
    metrics' ``protocol`` label), whether its client hung up, the W3C trace context it came
    with; after the call, the trace id it was recorded under."""

    gone: Callable[[], bool] | None = None
    traceparent: str | None = None
    trace_id: str | None = None
    timings: list[Trace] = field(default_factory=list)
    protocol: str = "http"


def make_tracer(settings: Settings, exporter: Any = None) -> Any:
    """The tracer the dataplane uses, or None when tracing is off. ``exporter`` (a span
    exporter, e.g. the SDK's in-memory one in tests) replaces the one the settings name."""
    kind = settings.traces_exporter()
    if exporter is None and kind is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.otel_service_name})
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider.get_tracer("slimserve")
