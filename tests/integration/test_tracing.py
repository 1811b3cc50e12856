"""OpenTelemetry spans for /v2 (which runs ahead of BentoML's own tracing), checked with the
SDK's in-memory exporter: one span per request continuing the client's traceparent, its
queue wait and onnxruntime run as children, the trace id back in a header and in the log."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.http.app import HttpApp
from service.serving.dataplane import DataPlane
from service.serving.store import ModelStore
from service.serving.tracing import make_tracer
from tests.conftest import asgi_post

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
BODY = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}


@pytest.fixture
def traced(tiny_repo: ModelRepository):
    exporter = InMemorySpanExporter()
    settings = Settings(model_repository=tiny_repo.root)
    store = ModelStore(tiny_repo, settings)
    store.load_all()
    return HttpApp(DataPlane(store, make_tracer(settings, exporter)), dict), exporter


_post = asgi_post


def test_a_request_is_a_span_with_its_queue_wait_and_run(traced) -> None:
    app, exporter = traced
    r = _post(app, "/v2/models/alpha/infer", json=BODY, headers={"traceparent": PARENT})
    assert r.status_code == 200 and r.headers["x-trace-id"] == TRACE
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"infer", "queue", "onnxruntime.run"}
    root = spans["infer"]
    assert format(root.context.trace_id, "032x") == TRACE
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"  # the client's span
    assert root.attributes["model"] == "alpha" and root.attributes["outcome"] == "success"
    for child in ("queue", "onnxruntime.run"):
        assert spans[child].parent.span_id == root.context.span_id
        assert root.start_time <= spans[child].start_time <= spans[child].end_time <= root.end_time
    assert spans["onnxruntime.run"].attributes["batch.samples"] == 2


def test_without_traceparent_a_new_trace_begins(traced) -> None:
    app, exporter = traced
    r = _post(app, "/v2/models/alpha/infer", json=BODY)
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "infer"]
    assert root.parent is None and r.headers["x-trace-id"] == format(root.context.trace_id, "032x")


def test_a_rejected_request_is_an_error_span_and_its_log_line_names_the_trace(
    traced, caplog
) -> None:
    app, exporter = traced
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    with caplog.at_level(logging.WARNING, logger="slimserve.http"):
        r = _post(app, "/v2/models/alpha/infer", json=bad, headers={"traceparent": PARENT})
    assert r.status_code == 400 and r.headers["x-trace-id"] == TRACE
    (root,) = exporter.get_finished_spans()
    assert root.attributes["outcome"] == "invalid_input" and not root.status.is_ok
    assert f"trace_id={TRACE}" in caplog.text


def test_friendly_endpoints_are_traced_too(traced) -> None:
    app, exporter = traced
    r = _post(app, "/transform", json={"model": "alpha", "rows": [[1, 2, 3, 4]]})
    assert r.status_code == 200, r.text
    assert "infer" in {s.name for s in exporter.get_finished_spans()}


def test_tracing_is_off_unless_the_otel_environment_asks(monkeypatch) -> None:
    assert make_tracer(Settings()) is None
    assert Settings(OTEL_TRACES_EXPORTER="none").traces_exporter() is None
    assert Settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318").traces_exporter() == "otlp"
    assert Settings(OTEL_TRACES_EXPORTER="console").traces_exporter() == "console"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert Settings().traces_exporter() == "otlp"
