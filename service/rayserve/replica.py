"""One replica of a model group: the worker's model store, batcher and v2 app in a Ray actor.

Each replica loads its group's models from the repository path every node sees (each file
checked against its manifest's sha256 on the node it lands on, as a worker does), batches the
requests it holds (``max_ongoing_requests`` of them at once) with slimserve's dynamic batcher,
and answers requests the router forwards through the same ASGI app a worker serves, so every
status, header and message is a worker's. Its metrics go to the :class:`MetricsBoard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import ray
from prometheus_client import REGISTRY, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..core.settings import Settings
from ..http.app import HttpApp
from ..http.asgi import Receive, Scope, Send
from ..serving.dataplane import DataPlane
from ..serving.lifecycle import Lifecycle
from ..serving.store import ModelStore
from ..serving.tracing import make_tracer
from .board import serve_metrics
from .forward import Answered, Forwarded, call_asgi
from .groups import Grouping, GroupRepository

__all__ = [
    "GroupReplica",
    "IngressGroup",
    "OPENAPI_BASE",
    "replica_deployment",
    "ingress_deployment",
]

log = logging.getLogger("slimserve.rayserve")

#: how long a stopping replica waits for the board to forget it
_DROP_TIMEOUT_S = 1.0

#: the document /docs.json builds on (BentoML's, in a worker)
OPENAPI_BASE: dict[str, Any] = {
    "openapi": "3.0.2",
    "info": {"title": "slimserve on Ray Serve", "version": "1"},
    "paths": {},
}


class GroupReplica:
    async def __init__(  # type: ignore[misc]  # Ray actors may construct asynchronously
        self,
        grouping: Grouping,
        group: str,
        settings: Settings,
        board: DeploymentHandle,
        push_s: float,
    ) -> None:
        self.group = group
        self.board = board
        repository = GroupRepository(settings.model_repository, grouping, group)
        store = ModelStore(repository, settings)
        lifecycle = Lifecycle(store, settings)
        lifecycle.start_blocking()  # before the replica takes requests, as a worker does
        self.dataplane = DataPlane(store, make_tracer(settings), lifecycle)
        self.http = HttpApp(self.dataplane, lambda: OPENAPI_BASE)
        lifecycle.ensure_tasks()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        self.labels = {"group": group, "replica": self.replica, "node": self.node[:12]}
        self.pusher = asyncio.get_running_loop().create_task(self._push(push_s))

    async def forward(self, request: Forwarded) -> Answered:
        return await call_asgi(self.http, request)

    def ready(self) -> dict[str, Any]:
        """This replica's readiness (a worker's ``/v2/health/ready``) and where it runs."""
        return {
            "ready": self.dataplane.server_ready(),
            "not_ready_models": self.dataplane.not_ready(),
            "models": sorted(n for n, m in self.dataplane.store.models.items() if m.ready),
            **self.labels,
        }

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        return self.dataplane.repository_index(ready_only)

    async def _push(self, every_s: float) -> None:
        while True:
            try:
                text = generate_latest(REGISTRY).decode()
                await self.board.push.remote(self.replica, self.labels, text)
            except Exception as exc:  # the board restarts; the next push catches up
                log.warning("replica %s: metrics not sent: %s", self.replica, exc)
            await asyncio.sleep(every_s)

    async def __del__(self) -> None:
        self.pusher.cancel()
        # the application may be going as a whole: then the board is too, and never answers
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.board.drop.remote(self.replica), _DROP_TIMEOUT_S)
        await self.dataplane.close()


class IngressGroup(GroupReplica):
    """The application's only group: Ray Serve's proxy hands requests straight to its
    replicas, which serve the worker's ASGI app and ``/metrics`` (no router, one Ray hop
    less: ``loadtest/published/*-ray.md``)."""

    def __serve_build_asgi_app__(self) -> Any:
        http, board = self.http, self.board

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            if scope["path"] == "/metrics":
                return await serve_metrics(board, send)
            await http(scope, receive, send)

        return app


#: made a deployment here, not with a decorator: a decorated class is not yet bound to its
#: module's name when Ray pickles it, so Ray would copy it by value with every global it reads
replica_deployment = serve.deployment()(GroupReplica)
ingress_deployment = serve.deployment()(serve.ingress()(IngressGroup))
