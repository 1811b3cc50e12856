"""One server worker: the BentoML service's ASGI app on uvicorn, on a socket the supervisor
passed down (``python -m service.server.worker --fd N --worker-id I --parent P``).

What BentoML's own worker script does (load the service, set its server context, build the
app with ``Service.to_asgi``, run uvicorn on the inherited socket), with the settings BentoML's
script does not expose: uvloop and httptools by name, the connection cap and the header and
body timeouts of :mod:`service.server.connections`, keep-alive and graceful-shutdown times, no
access log. The worker also dies with its supervisor (``PR_SET_PDEATHSIG``), so a killed
supervisor leaves no worker behind holding the port.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, cast

import uvicorn

from ..core.settings import Settings, get_settings
from .connections import ConnectionLimits, guarded_protocol

__all__ = ["main", "die_with_parent", "raise_file_limit"]

log = logging.getLogger("slimserve.worker")
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask Linux to send SIGTERM when the parent exits; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        raise SystemExit(f"slimserve worker: supervisor {parent} is gone; exiting")


def raise_file_limit(connections: int) -> int:
    """Raise the soft open-file limit to the hard one, so the connection cap (not the
    descriptors) is what refuses clients; warn when the cap cannot fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if connections + 256 > soft:
        log.warning(
            "SLIMSERVE_MAX_CONNECTIONS=%d leaves fewer than 256 of the %d file descriptors "
            "this process may open for models and logs; lower it or raise `ulimit -n`",
            connections,
            soft,
        )
    return soft


def _set_server_context(service: object, worker_id: int) -> None:
    """What BentoML's worker script tells BentoML about the process it runs in."""
    from bentoml._internal.context import server_context
    from bentoml._internal.utils.uri import join_paths

    server_context.worker_index = worker_id
    server_context.service_type = "entry_service"
    name = service.name  # type: ignore[attr-defined]
    server_context.service_name = name
    server_context.service_routes = [
        join_paths(service.path_prefix, api.route)  # type: ignore[attr-defined]
        for api in service.apis.values()  # type: ignore[attr-defined]
    ]
    server_context.bento_name = name
    server_context.bento_version = "not available"


def _uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    from ..serving.metrics import metrics

    limits = ConnectionLimits(
        max_connections=settings.max_connections,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    return uvicorn.Config(
        app=app,  # type: ignore[arg-type]
        loop="uvloop",
        http=guarded_protocol(
            limits,
            lambda: metrics().connections_refused.inc(),
            _lean_app(),
            settings.max_body_bytes,
        ),
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        backlog=settings.backlog,
    )


def _lean_app() -> Callable[[], Any]:
    """The service instance's lean app, once BentoML has created it (None before)."""
    found: Any = None

    def get() -> Any:
        nonlocal found
        if found is None:
            import bentoml

            service = bentoml.get_current_service()
            found = getattr(service, "http", None) if service is not None else None
        return found

    return get


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.server.worker")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket")
    parser.add_argument("--worker-id", type=int, default=1)
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    settings = get_settings()
    raise_file_limit(settings.max_connections)

    from bentoml._internal.log import configure_server_logging

    configure_server_logging()  # before the service module sets up slimserve's loggers
    for name, logger in logging.root.manager.loggerDict.items():  # dictConfig disabled them
        if name.startswith("slimserve") and isinstance(logger, logging.Logger):
            logger.disabled = False
    from ..http.bento import SlimServe

    _set_server_context(SlimServe, args.worker_id)
    # BentoML's app with the lean one in front (service.http.outermost wraps to_asgi)
    app = cast(Any, SlimServe).to_asgi(is_main=True)
    server = uvicorn.Server(_uvicorn_config(app, settings))
    server.run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
