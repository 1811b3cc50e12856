"""The application's ingress: Ray Serve's HTTP proxy hands every request to the router, which
sends each to the group that serves its model and answers what concerns the whole application.

- ``/v2/models/{name}/...``, ``/v2/repository/models/{name}/...`` and the friendly endpoints
  (the model is in their JSON body) go to the group of that model (:mod:`.groups`).
- ``/v2/health/ready`` asks every group: ready while each has a replica that serves; the body
  has each group's answer, with the replica and node that gave it.
- ``/v2/repository/index`` is every group's index, merged.
- ``/metrics`` is every replica's metrics with ``group``, ``replica`` and ``node`` labels.
- The rest (``/v2``, ``/v2/health/live``, ``/docs.json``, unknown paths) any group answers.

A replica that stops while it holds a request (killed, or its node gone), or a group whose
replicas are all busy, is a 503 with ``Retry-After``: retriable, as a worker's full queue is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from ..core.errors import ModelNotFound, ServingError, Unavailable
from ..core.logs import clip
from ..core.protocol import dumps
from ..core.settings import Settings
from ..http import friendly
from ..http.asgi import JSON, ClientGone, Receive, Scope, Send, respond, respond_error
from .board import serve_metrics
from .forward import Answered, Forwarded, read_request, send_answer
from .groups import Grouping

__all__ = ["Router"]

log = logging.getLogger("slimserve.rayserve")

#: how long a group may take to say whether it is ready
_READY_TIMEOUT_S = 5.0


class Router:
    def __init__(
        self,
        grouping: Grouping,
        settings: Settings,
        groups: dict[str, DeploymentHandle],
        board: DeploymentHandle,
    ) -> None:
        self.grouping = grouping
        self.groups = groups
        self.board = board
        self.limit = settings.max_body_bytes
        self.retry_after_s = settings.retry_after_s
        self.first = next(iter(groups))

    def __serve_build_asgi_app__(self) -> Any:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                await self.serve(scope, receive, send)

        return app

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        try:
            if path == "/metrics":
                return await serve_metrics(self.board, send)
            if path == "/v2/health/ready" and scope["method"] == "GET":
                return await self._ready(send)
            request = await read_request(scope, receive, self.limit)
            if path == "/v2/repository/index" and scope["method"] == "POST":
                return await self._index(request, send)
            await send_answer(send, await self._forward(self._group_for(request), request))
        except ClientGone:
            return
        except ServingError as exc:
            await respond_error(send, exc)
        except (RayActorError, RayServeException) as exc:  # the metrics board restarting
            log.warning("%s %s failed: %s", scope["method"], clip(path), exc)
            await respond_error(send, Unavailable(f"{clip(path)}: retry", self.retry_after_s))
        except Exception:
            log.exception("500 %s %s", scope["method"], clip(path))
            await respond(send, 500, dumps({"error": "internal server error"}), JSON)

    def _group_for(self, request: Forwarded) -> str:
        """The group that answers ``request``: its model's, else any group."""
        model = _model_of(request)
        if model is None:
            return self.first
        group = self.grouping.group_of(model)
        if group is None:
            names = ", ".join(g.name for g in self.grouping.groups)
            raise ModelNotFound(
                f"model {clip(model, 64)!r} is served by no group of this application: "
                f"SLIMSERVE_RAY_GROUPS names none that matches it (groups: {names})"
            )
        return group.name

    async def _forward(self, group: str, request: Forwarded) -> Answered:
        try:
            answer: Answered = await self.groups[group].forward.remote(request)
            return answer
        except BackPressureError:
            raise Unavailable(
                f"group {group!r}: every replica holds as many requests as it takes "
                "(SLIMSERVE_RAY_MAX_ONGOING_REQUESTS); retry",
                self.retry_after_s,
            ) from None
        except (RayActorError, RayServeException) as exc:
            log.warning("group %s: %s %s failed: %s", group, request.method, request.path, exc)
            raise Unavailable(
                f"group {group!r}: the replica answering this request stopped "
                f"({type(exc).__name__}); retry, another replica takes it",
                self.retry_after_s,
            ) from None

    async def _ready(self, send: Send) -> None:
        names = list(self.groups)
        answers = await asyncio.gather(*(self._group_ready(g) for g in names))
        groups = dict(zip(names, answers, strict=True))
        ready = all(a["ready"] for a in answers)
        body = {
            "ready": ready,
            "not_ready_models": {k: v for a in answers for k, v in a["not_ready_models"].items()},
            "groups": groups,
        }
        headers = JSON if ready else {**JSON, "Retry-After": str(self.retry_after_s)}
        await respond(send, 200 if ready else 503, dumps(body), headers)

    async def _group_ready(self, group: str) -> dict[str, Any]:
        try:
            call = self.groups[group].ready.remote()
            answer: dict[str, Any] = await asyncio.wait_for(call, _READY_TIMEOUT_S)
            return answer
        except Exception as exc:
            return {"ready": False, "not_ready_models": {}, "error": f"{type(exc).__name__}"}

    async def _index(self, request: Forwarded, send: Send) -> None:
        ready_only = False
        if request.body.strip():
            try:
                doc = orjson.loads(request.body)
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
                # a group answers the malformed request with the worker's own 400
                return await send_answer(send, await self._forward(self.first, request))
            ready_only = doc.get("ready", False)
        indexes = await asyncio.gather(*(h.index.remote(ready_only) for h in self.groups.values()))
        merged = sorted((m for index in indexes for m in index), key=lambda m: m["name"])
        await respond(send, 200, dumps(merged), JSON)


def _model_of(request: Forwarded) -> str | None:
    """The model a request names: in its path (``/v2/models/{name}``,
    ``/v2/repository/models/{name}``) or, for a friendly endpoint, its JSON body's ``model``."""
    parts = request.path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "v2" and parts[1] == "models":
        return parts[2]
    if len(parts) >= 4 and parts[:3] == ["v2", "repository", "models"]:
        return parts[3]
    if request.path in friendly.ROUTES and request.method == "POST":
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return None  # the group's endpoint says what is wrong with it
        model = doc.get("model") if isinstance(doc, dict) else None
        return model if isinstance(model, str) else None
    return None


router_deployment = serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)(
    serve.ingress()(Router)
)
