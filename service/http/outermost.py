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
registered here, the app it returns is a path dispatcher (:class:`Front`): ``/v2...``, the
friendly endpoints and unknown paths to the lean app, BentoML's own routes (lifespan included)
to BentoML's app, which keeps lifecycle, ``/livez``, ``/readyz``, ``/metrics`` and the docs
page. slimserve's own worker (:mod:`service.server.worker`) builds its app the same way, with
the same call.

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
from collections.abc import Iterable
from typing import Any

__all__ = [
    "Front",
    "mount_outermost",
    "check_bentoml_internals",
    "require_live",
    "OutermostRouteDead",
]

log = logging.getLogger("slimserve.outermost")

#: service name -> (prefix, lean app, lean paths), for every service registered here
_REGISTRY: dict[str, tuple[str, Any, frozenset[str]]] = {}
#: service name -> how its prefix is served: "outermost" (in front of BentoML's middleware,
#: set when BentoML built the app) or "mounted" (the public fallback)
_LIVE: dict[str, str] = {}


class OutermostRouteDead(RuntimeError):
    """The lean app is registered but no route reaches it."""


class Front:
    """The worker's app: the lean app first, BentoML's stack for BentoML's own routes.

    To the lean app go ``prefix`` (``/v2``) and everything below it, ``lean_paths`` (the
    friendly endpoints, the OpenAPI document), and every path BentoML has no route for (the
    lean app answers it 404), so that BentoML's middleware, which labels its metrics by raw
    path, never sees an unknown URL. BentoML gets its health, metrics, docs page and assets
    routes, and the lifespan.
    """

    __slots__ = (
        "lean",
        "bento",
        "prefix",
        "prefix_slash",
        "lean_paths",
        "bento_paths",
        "bento_dirs",
    )

    def __init__(self, lean: Any, bento: Any, prefix: str, lean_paths: Iterable[str] = ()) -> None:
        self.lean, self.bento = lean, bento
        self.prefix = prefix.rstrip("/")
        self.prefix_slash = self.prefix + "/"
        self.lean_paths = frozenset(lean_paths)
        self.bento_paths, self.bento_dirs = _routes_of(bento)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith(self.prefix_slash) or path == self.prefix or path in self.lean_paths:
                return await self.lean(scope, receive, send)
            if (
                self.bento_paths is not None
                and path not in self.bento_paths
                and not path.startswith(self.bento_dirs)
            ):
                return await self.lean(scope, receive, send)
        return await self.bento(scope, receive, send)


def _routes_of(app: Any) -> tuple[frozenset[str] | None, tuple[str, ...]]:
    """The exact paths and the folders (mounts, path parameters) a Starlette app routes;
    ``(None, ())`` when ``app`` is not one (then everything else goes to BentoML)."""
    routes = getattr(getattr(app, "router", None), "routes", None)
    if not isinstance(routes, list):
        log.warning("BentoML's app has no route list; unknown paths go through its stack")
        return None, ()
    paths: set[str] = set()
    dirs: list[str] = []
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        if "{" in path or not hasattr(route, "methods"):  # a mount or a parameter
            dirs.append(path.split("{")[0].rstrip("/") + "/")
        else:
            paths.add(path)
    return frozenset(paths), tuple(dirs)


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


def mount_outermost(
    service: Any, lean_app: Any, prefix: str = "/v2", lean_paths: Iterable[str] = ()
) -> str:
    """Serve ``prefix`` of ``service`` (a ``@bentoml.service`` class), ``lean_paths`` and
    unknown paths with ``lean_app``, in front of BentoML's middleware where this BentoML allows
    it; else mount ``prefix`` the public way (the other paths stay BentoML's). Returns
    ``"outermost"`` or ``"mounted"``."""
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
    _REGISTRY[service.name] = (prefix, lean_app, frozenset(lean_paths))
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
            prefix, lean, lean_paths = registered
            app = Front(lean, app, prefix, lean_paths)
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
