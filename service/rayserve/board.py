"""``/metrics`` of the Ray Serve application: every replica's own metrics, each with its labels.

A replica's metrics live in its own process (prometheus_client, the same series as a worker's),
and a Ray Serve handle reaches *some* replica, never a chosen one, so replicas send their
exposition to the :class:`MetricsBoard` every ``SLIMSERVE_RAY_METRICS_PUSH_S`` seconds (and
when they stop). ``/metrics`` is the board's merge: one family per name, every sample labelled
with the ``group``, ``replica`` and ``node`` it came from. A replica silent for three periods
(killed, or its node gone) drops out, as a target Prometheus can no longer scrape would.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..http.asgi import Send, respond

__all__ = ["MetricsBoard", "federate", "serve_metrics", "board_deployment"]

PROMETHEUS = {"content-type": "text/plain; version=0.0.4; charset=utf-8"}

#: periods of silence after which a replica's metrics are dropped
STALE_PERIODS = 3


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def federate(expositions: Iterable[tuple[dict[str, str], str]]) -> bytes:
    """One exposition of several, each sample with its source's labels added."""
    merged: dict[str, Metric] = {}
    for labels, text in expositions:
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            into.samples += [s._replace(labels={**s.labels, **labels}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))  # type: ignore[arg-type]
    return generate_latest(registry)


class MetricsBoard:
    def __init__(self, push_s: float) -> None:
        self.stale_after_s = STALE_PERIODS * push_s
        self.latest: dict[str, tuple[dict[str, str], str, float]] = {}

    def push(self, replica: str, labels: dict[str, str], text: str) -> None:
        self.latest[replica] = (labels, text, time.monotonic())

    def drop(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def replicas(self) -> dict[str, dict[str, str]]:
        """The replicas heard from lately, with their labels."""
        return {r: labels for r, (labels, _, _) in self._fresh().items()}

    def collect(self) -> bytes:
        return federate((labels, text) for labels, text, _ in self._fresh().values())

    def _fresh(self) -> dict[str, tuple[dict[str, str], str, float]]:
        now = time.monotonic()
        for replica, (_, _, at) in list(self.latest.items()):
            if now - at > self.stale_after_s:
                del self.latest[replica]
        return self.latest


board_deployment = serve.deployment(
    num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024
)(MetricsBoard)


async def serve_metrics(board: DeploymentHandle, send: Send) -> None:
    """``GET /metrics``: the board's merge of every replica's metrics."""
    await respond(send, 200, await board.collect.remote(), PROMETHEUS)
