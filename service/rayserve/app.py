"""The Ray Serve application: a router, one deployment per model group, a metrics board.

::

    Ray Serve HTTP proxy -> Router -> group-<name> replicas (store, batcher, onnxruntime)
                                \\-> MetricsBoard <- every replica's metrics

    one group:  Ray Serve HTTP proxy -> group-default replicas  (no router: one hop less)

:func:`build` turns the settings into the application ``serve.run`` deploys: how each group
scales (``num_replicas`` or Ray Serve's ``autoscaling_config``), what a replica reserves and
holds, and the settings the replicas serve with (every ``SLIMSERVE_*`` the driver has, the
repository as an absolute path, onnxruntime threads matching the CPUs a replica reserves).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application
from ray.serve.config import AutoscalingConfig

from ..core.settings import RayServeSettings, Settings
from .board import board_deployment
from .groups import Group, Grouping
from .replica import ingress_deployment, replica_deployment
from .router import router_deployment

__all__ = ["build", "replica_settings", "deployment_options"]

#: Ray Serve logs a line per request by default; slimserve's metrics count them instead
QUIET = {"enable_access_log": False}
#: the repository API's shared decisions, below the repository (every node sees it)
CONTROL_FOLDER = ".slimserve-ray"


def replica_settings(settings: Settings, ray_settings: RayServeSettings) -> Settings:
    """What every replica serves with: the driver's settings, the repository's absolute path
    (replicas run from other folders), onnxruntime threads for the CPUs a replica reserves
    (unless set), no gRPC listener, and in explicit or poll mode a folder under the repository
    through which the repository API's loads and unloads reach every replica."""
    repository = settings.model_repository.resolve()
    runtime_dir = settings.runtime_dir
    if runtime_dir is None and settings.model_control != "none":
        runtime_dir = repository / CONTROL_FOLDER / ray_settings.app_name
    threads = settings.intra_op_threads or max(1, round(ray_settings.replica_cpus))
    return settings.model_copy(
        update={
            "model_repository": repository,
            "runtime_dir": runtime_dir,
            "intra_op_threads": threads,
            "grpc_port": 0,
            "workers": 1,
        }
    )


#: the autoscaling_config fields a setting is most likely to want (messages list them)
_AUTOSCALING_FIELDS = (
    "min_replicas",
    "max_replicas",
    "initial_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "metrics_interval_s",
    "look_back_period_s",
)


def deployment_options(
    group: Group, ray_settings: RayServeSettings, graceful_shutdown_s: float
) -> dict[str, Any]:
    """Ray Serve's options for ``group``'s deployment; :class:`ValueError` naming the setting
    when an autoscaling config is not one Ray Serve takes."""
    options: dict[str, Any] = {
        "name": f"group-{group.name}",
        "max_ongoing_requests": ray_settings.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": ray_settings.replica_cpus},
        "logging_config": QUIET,
        # requests in flight get this long to finish when a replica stops (as a worker's do)
        "graceful_shutdown_timeout_s": graceful_shutdown_s,
    }
    autoscaling = group.autoscaling
    if autoscaling is None and group.num_replicas is None:
        autoscaling = ray_settings.autoscaling
    if autoscaling is None:
        options["num_replicas"] = group.num_replicas or ray_settings.num_replicas
        return options
    where = "SLIMSERVE_RAY_GROUPS" if group.autoscaling else "SLIMSERVE_RAY_AUTOSCALING"
    unknown = sorted(set(autoscaling) - set(AutoscalingConfig.model_fields))
    if unknown:  # Ray Serve would ignore them silently
        raise ValueError(
            f"{where}: group {group.name!r}: not an autoscaling config Ray Serve takes: "
            f"unknown {', '.join(unknown)}; expected some of {', '.join(_AUTOSCALING_FIELDS)}"
        )
    try:
        AutoscalingConfig(**autoscaling)
    except (ValidationError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}: group {group.name!r}: not an autoscaling config Ray Serve takes: {exc}"
        ) from None
    options["autoscaling_config"] = autoscaling
    return options


def build(settings: Settings, ray_settings: RayServeSettings, names: list[str]) -> Application:
    """The application for the repository's models ``names``; :class:`ValueError` for
    settings that cannot make one."""
    grouping = Grouping.from_settings(ray_settings, names)
    served = replica_settings(settings, ray_settings)
    quick: dict[str, Any] = {"logging_config": QUIET, "graceful_shutdown_timeout_s": 2}
    board = board_deployment.options(**quick).bind(ray_settings.metrics_push_s)
    # one group: its replicas take requests from the proxy themselves (no router)
    deployment = ingress_deployment if len(grouping.groups) == 1 else replica_deployment
    groups = {
        group.name: deployment.options(
            **deployment_options(group, ray_settings, settings.graceful_shutdown_s)
        ).bind(grouping, group.name, served, board, ray_settings.metrics_push_s)
        for group in grouping.groups
    }
    if len(groups) == 1:
        return next(iter(groups.values()))
    router = router_deployment.options(num_replicas=ray_settings.router_replicas, **quick)
    return router.bind(grouping, served, groups, board)
