"""The one module that defines slimserve's Prometheus metrics.

Metrics are created on first use, never at import time: BentoML switches prometheus_client to
multiprocess mode (PROMETHEUS_MULTIPROC_DIR) when its workers start, and a metric created before
that would be invisible on ``/metrics`` (BentoML issue 5056, kserve issue 2979). Labels are
model, version and variant of *known* models only, so an unknown URL can never add a series.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["ServingMetrics", "Meters", "metrics", "LATENCY_BUCKETS", "UNKNOWN_MODEL", "PROTOCOLS"]

#: 50 µs .. 10 s
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: the one label value used for requests that name a model the server does not have
UNKNOWN_MODEL = "_unknown"
_LABELS = ("model", "version", "variant")
#: the ``protocol`` label of the request metrics: how the request came (the v2 REST API and
#: the friendly endpoints are ``http``; the v2 gRPC service is ``grpc``)
PROTOCOLS = ("http", "grpc")


class ServingMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "slimserve_requests_total",
            "Inference requests by outcome (success, invalid_input, not_found, too_large, "
            "overloaded, not_ready, unavailable, client_gone, error) and protocol (http, grpc).",
            [*_LABELS, "outcome", "protocol"],
        )
        self.request_duration = Histogram(
            "slimserve_request_duration_seconds",
            "Time from receiving an inference request to its response, by protocol (http, grpc).",
            [*_LABELS, "protocol"],
            buckets=LATENCY_BUCKETS,
        )
        self.queue_duration = Histogram(
            "slimserve_queue_duration_seconds",
            "Time a request waited in the batcher's queue.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
        )
        self.compute_duration = Histogram(
            "slimserve_compute_duration_seconds",
            "Duration of one onnxruntime run (one batch).",
            _LABELS,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size_samples",
            "Samples per onnxruntime run.",
            _LABELS,
            buckets=BATCH_BUCKETS,
        )
        self.samples = Counter(
            "slimserve_inference_samples_total",
            "Samples inferred (inference count).",
            _LABELS,
        )
        self.executions = Counter(
            "slimserve_batch_executions_total",
            "onnxruntime runs (execution count); samples / executions is the mean batch size.",
            _LABELS,
        )
        self.in_flight = Gauge(
            "slimserve_requests_in_flight",
            "Inference requests being served now (pending).",
            _LABELS,
            multiprocess_mode="livesum",
        )
        self.load_seconds = Gauge(
            "slimserve_model_load_seconds",
            "Time onnxruntime took to load the model.",
            _LABELS,
            multiprocess_mode="max",
        )
        self._http_and_models()
        self._shadows()

    def _http_and_models(self) -> None:
        """What the HTTP front refused, and the models' lifecycle."""
        self.http_errors = Counter(
            "slimserve_http_errors_total",
            "Error answers of the lean HTTP app by endpoint (v2, classify, regress, transform, "
            "generate, docs.json, other: any unknown path) and status.",
            ["endpoint", "status"],
        )
        self.connections_refused = Counter(
            "slimserve_connections_refused_total",
            "HTTP connections refused at once because the worker had SLIMSERVE_MAX_CONNECTIONS "
            "open.",
        )
        self.model_loads = Counter(
            "slimserve_model_loads_total",
            "Model versions loaded, refused (a step of loading failed; the reason is in the "
            "repository index), unloaded and evicted (memory budget), by model.",
            ["model", "outcome"],
        )
        self.cold_start = Histogram(
            "slimserve_model_cold_start_seconds",
            "Time a request waited for its evicted model to be loaded again.",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.sessions_open = Gauge(
            "slimserve_sessions_open",
            "onnxruntime sessions open in the workers (one per loaded variant).",
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "slimserve_model_info",
            "1 for each loaded model, labelled with the execution provider in use; 0 when it "
            "failed to load or was unloaded.",
            [*_LABELS, "provider"],
            multiprocess_mode="max",
        )

    def _shadows(self) -> None:
        """Shadow traffic compared with the primary's answers."""
        self.shadow_comparisons = Counter(
            "slimserve_shadow_comparisons_total",
            "Samples the shadow target answered, compared with the primary's answer: agree, "
            "disagree, or dropped (shadow backlog full) and failed.",
            ["model", "shadow", "outcome"],
        )
        self.shadow_difference = Histogram(
            "slimserve_shadow_max_abs_difference",
            "Largest absolute difference between the shadow's and the primary's outputs, per "
            "request.",
            ["model", "shadow"],
            buckets=(0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0),
        )


class Meters:
    """One variant's request metrics, bound to its labels once (at load), so that a request
    pays one increment, not a label lookup, per metric. ``success`` and ``duration`` are by
    protocol."""

    __slots__ = ("labels", "success", "duration", "in_flight", "_outcomes")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        m = metrics()
        self.labels = labels
        self.success = {p: m.requests.labels(*labels, "success", p) for p in PROTOCOLS}
        self.duration = {p: m.request_duration.labels(*labels, p) for p in PROTOCOLS}
        self.in_flight = m.in_flight.labels(*labels)
        self._outcomes: dict[tuple[str, str], Any] = {}

    def outcome(self, outcome: str, protocol: str) -> Any:
        """The request counter of ``outcome`` over ``protocol`` (bound on first use)."""
        child = self._outcomes.get((outcome, protocol))
        if child is None:
            child = metrics().requests.labels(*self.labels, outcome, protocol)
            self._outcomes[outcome, protocol] = child
        return child


@cache
def metrics() -> ServingMetrics:
    """The metrics, created on the first call (after BentoML set up multiprocess mode)."""
    return ServingMetrics()


def statistics() -> dict[tuple[str, str], dict[str, float]]:
    """Per ``(model, version)``, summed over variants, protocols and worker processes (what
    ``/metrics`` shows): ``success`` and ``success_s`` (requests answered and their time),
    ``fail``, ``queue``/``queue_s`` (requests' waits in the batcher), ``compute``/``compute_s``
    (onnxruntime runs and their time), ``samples`` and ``executions``. Read on demand (the
    v2 gRPC ModelStatistics), never on the request path."""
    import os

    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    registry: Any = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        metrics()  # the series exist before they are read
    wanted = {
        "slimserve_request_duration_seconds_count": "success",
        "slimserve_request_duration_seconds_sum": "success_s",
        "slimserve_queue_duration_seconds_count": "queue",
        "slimserve_queue_duration_seconds_sum": "queue_s",
        "slimserve_compute_duration_seconds_count": "compute",
        "slimserve_compute_duration_seconds_sum": "compute_s",
        "slimserve_inference_samples_total": "samples",
        "slimserve_batch_executions_total": "executions",
    }
    stats: dict[tuple[str, str], dict[str, float]] = {}
    for family in registry.collect():
        if not family.name.startswith("slimserve_"):
            continue
        for sample in family.samples:
            labels = sample.labels
            key = wanted.get(sample.name)
            if sample.name == "slimserve_requests_total" and labels.get("outcome") != "success":
                key = "fail"
            if key is None or "model" not in labels or labels["model"] == UNKNOWN_MODEL:
                continue
            row = stats.setdefault((labels["model"], labels["version"]), {})
            row[key] = row.get(key, 0.0) + sample.value
    return stats
