"""``python -m service.rayserve`` (``make serve-ray``): deploy slimserve on Ray Serve and stay.

Starts a local Ray (``SLIMSERVE_RAY_NUM_CPUS`` CPUs, or all) or joins the cluster
``RAY_ADDRESS`` names, starts Ray Serve's HTTP proxy on ``SLIMSERVE_RAY_HOST`` and
``SLIMSERVE_RAY_PORT`` (127.0.0.1:8000) and deploys the application (:mod:`.app`) at ``/``.
SIGTERM or SIGINT deletes the application and stops the Ray it started (a joined cluster
keeps running). Exit status: 0 after a signal, 2 for settings that make no application, 1
when it cannot deploy.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import ray
from ray import serve

from ..core.repository import ModelRepository
from ..core.settings import get_ray_settings, get_settings
from .app import build

log = logging.getLogger("slimserve.rayserve")


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings, ray_settings = get_settings(), get_ray_settings()
    names = ModelRepository(settings.model_repository).names()
    try:
        app = build(settings, ray_settings, names)
    except ValueError as exc:
        print(f"slimserve on Ray Serve: {exc}", file=sys.stderr)
        return 2
    local = ray_settings.address is None
    ray.init(
        address=ray_settings.address,
        num_cpus=ray_settings.num_cpus if local else None,
        namespace="slimserve",
        include_dashboard=False,
        log_to_driver=False,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(
            proxy_location=ray_settings.proxy_location,
            http_options={"host": ray_settings.host, "port": ray_settings.port},
        )
        serve.run(app, name=ray_settings.app_name, route_prefix="/", blocking=False)
    except Exception as exc:
        log.error("could not deploy %s: %s", ray_settings.app_name, exc)
        _stop(ray_settings.app_name, local)
        return 1
    log.info(
        "serving %d models on http://%s:%d (Ray %s; SIGTERM stops it)",
        len(names),
        ray_settings.host,
        ray_settings.port,
        "started here" if local else f"at {ray_settings.address}",
    )
    stop.wait()
    log.info("stopping %s", ray_settings.app_name)
    _stop(ray_settings.app_name, local)
    return 0


def _stop(app_name: str, local: bool) -> None:
    try:
        serve.delete(app_name)
        if local:
            serve.shutdown()
    finally:
        if local:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
