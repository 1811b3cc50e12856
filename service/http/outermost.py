"""Put the lean ``/v2`` app in front of BentoML's middleware stack: the one place that touches
BentoML internals.

Why: every route BentoML builds, ``@bentoml.asgi_app`` mounts included, runs through its
traffic-metrics (labelled by raw path: unbounded series), OpenTelemetry, access-log, timeout and
context middlewares. Measured here on 2 cores, 64 clients: the same handler served 4,741-4,909
req/s in front of the stack against 2,660-2,689 req/s mounted with the access log off and /v2
excluded from tracing (BentoML's public options alone).

How: BentoML 1.4's worker builds its ASGI app with exactly one call,
``service.to_asgi(is_main=...)`` (``_bentoml_impl/worker/service.py``), and hands the result to
uvicorn. We wrap ``_bentoml_sdk.service.factory.Service.to_asgi`` so that, for services
registered here, the app it returns is a path dispatcher: ``/v2...`` to the lean app,
everything else (lifespan included) to BentoML's app, which keeps workers, lifecycle,
``/livez``, ``/readyz`` and ``/metrics``.

When an upgrade moves that hook, nothing fails silently: :func:`check_bentoml_internals` is
asked at import, and a BentoML that no longer builds its app through ``to_asgi`` gets ``/v2``
mounted with BentoML's public ``mount_asgi_app`` instead (slower, behind its middleware), with a
warning. The worker then calls :func:`require_live` at start, which raises when neither route
is in place, so a server can never come up "ready" with every ``/v2`` call a 404. Services are
matched by name, not identity: a service module imported twice is still one service.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

__all__ = [
    "PrefixDispatch",
    "mount_outermost",
    "check_bentoml_internals",
    "require_live",
    "OutermostRouteDead",
]

log = logging.getLogger("slimserve.outermost")

#: service name -> (prefix, lean app), for every service registered here
_REGISTRY: dict[str, tuple[str, Any]] = {}
#: service name -> how its prefix is served: "outermost" (in front of BentoML's middleware,
#: set when BentoML built the app) or "mounted" (the public fallback)
_LIVE: dict[str, str] = {}


class OutermostRouteDead(RuntimeError):
    """The lean app is registered but no route reaches it."""


class PrefixDispatch:
    """``prefix`` and ``prefix/...`` go to ``lean``; everything else goes to ``bento``."""

    __slots__ = ("lean", "bento", "prefix", "prefix_slash")

    def __init__(self, lean: Any, bento: Any, prefix: str) -> None:
        self.lean, self.bento = lean, bento
        self.prefix = prefix.rstrip("/")
        self.prefix_slash = self.prefix + "/"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith(self.prefix_slash) or path == self.prefix:
                return await self.lean(scope, receive, send)
        return await self.bento(scope, receive, send)


def check_bentoml_internals() -> None:
    """Raise when the BentoML release no longer builds its worker app through ``to_asgi``."""
    from _bentoml_impl.worker import service as worker
    from _bentoml_sdk.service.factory import Service

    original = getattr(Service.to_asgi, "__wrapped__", Service.to_asgi)
    params = list(inspect.signature(original).parameters)
    if params != ["self", "is_main"]:
        raise RuntimeError(f"bentoml Service.to_asgi signature changed to {params}")
    source = inspect.getsource(worker)
    if "service.to_asgi(" not in source or "uvicorn.Config(" not in source:
        raise RuntimeError(
            "bentoml's worker no longer builds its app with service.to_asgi(); "
            "the outermost /v2 route of service/http/outermost.py would be dead"
        )


def mount_outermost(service: Any, lean_app: Any, prefix: str = "/v2") -> str:
    """Serve ``prefix`` of ``service`` (a ``@bentoml.service`` class) with ``lean_app``, in
    front of BentoML's middleware where this BentoML allows it, else mounted the public way.
    Returns ``"outermost"`` or ``"mounted"``."""
    try:
        check_bentoml_internals()
    except Exception as exc:  # any change in BentoML's internals: take the public road
        log.warning(
            "BentoML internals changed (%s); serving %s through mount_asgi_app, behind "
            "BentoML's middleware (slower)",
            exc,
            prefix,
        )
        service.mount_asgi_app(lean_app, path=prefix, name=f"slimserve{prefix}")
        _LIVE[service.name] = "mounted"
        return "mounted"
    _REGISTRY[service.name] = (prefix, lean_app)
    _wrap_to_asgi()
    return "outermost"


def _wrap_to_asgi() -> None:
    from _bentoml_sdk.service.factory import Service

    if getattr(Service.to_asgi, "__slimserve_outermost__", False):
        return
    original = Service.to_asgi

    @functools.wraps(original)
    def to_asgi(self: Any, is_main: bool = True) -> Any:
        app = original(self, is_main=is_main)
        registered = _REGISTRY.get(self.name)
        if registered is not None:
            prefix, lean = registered
            app = PrefixDispatch(lean, app, prefix)
            _LIVE[self.name] = "outermost"
        return app

    to_asgi.__slimserve_outermost__ = True  # type: ignore[attr-defined]
    Service.to_asgi = to_asgi  # type: ignore[method-assign]


def require_live(name: str) -> str:
    """How ``name``'s lean route is served; :class:`OutermostRouteDead` when it is not (the
    worker built its app some other way). Call it when the worker starts."""
    how = _LIVE.get(name)
    if how is None:
        raise OutermostRouteDead(
            f"service {name!r}: the worker's ASGI app was built without the /v2 route "
            "(BentoML no longer calls Service.to_asgi); refusing to start with every /v2 "
            "call a 404"
        )
    return how
