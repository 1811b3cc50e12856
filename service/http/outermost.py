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
``/livez``, ``/readyz`` and ``/metrics``. :func:`check_bentoml_internals` fails loudly when an
upgrade moves that hook (``tests/unit/service/test_outermost.py`` calls it).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["PrefixDispatch", "mount_outermost", "check_bentoml_internals"]

_REGISTRY: list[tuple[Any, str, Any]] = []  # (service, prefix, lean app)


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
            "the outermost /v2 route of service/outermost.py would be dead"
        )


def mount_outermost(service: Any, lean_app: Any, prefix: str = "/v2") -> None:
    """Serve ``prefix`` of ``service`` (a ``@bentoml.service`` class) with ``lean_app``."""
    from _bentoml_sdk.service.factory import Service

    _REGISTRY.append((service, prefix, lean_app))
    if getattr(Service.to_asgi, "__slimserve_outermost__", False):
        return
    original = Service.to_asgi

    @functools.wraps(original)
    def to_asgi(self: Any, is_main: bool = True) -> Any:
        app = original(self, is_main=is_main)
        for registered, pfx, lean in _REGISTRY:
            if registered is self:
                app = PrefixDispatch(lean, app, pfx)
        return app

    to_asgi.__slimserve_outermost__ = True  # type: ignore[attr-defined]
    Service.to_asgi = to_asgi  # type: ignore[method-assign]
