"""Every setting of the server, read once from ``SLIMSERVE_*`` environment variables.

Nothing else on the serving side reads ``os.environ``. Example: ``SLIMSERVE_PORT=3001
SLIMSERVE_MAX_BATCH_SIZE=32 make serve``.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .policies import Traffic, VersionPolicy

__all__ = [
    "Settings",
    "ModelServing",
    "ModelGroup",
    "RayServeSettings",
    "get_settings",
    "get_ray_settings",
    "usable_cpus",
]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; a container's cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SLIMSERVE_", extra="ignore", populate_by_name=True
    )

    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int = Field(3000, ge=1, le=65535, description="Port the server listens on.")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the v2 gRPC service (inference.GRPCInferenceService) on the same "
        "host; 0 turns gRPC off. Every worker serves it (SO_REUSEPORT).",
    )
    grpc_server: Literal["slimserve", "grpcio"] = Field(
        "slimserve",
        description="What serves gRPC: slimserve's own HTTP/2 transport on the worker's event "
        "loop (service/grpc/h2.py), or grpcio's grpc.aio server (a third of the throughput "
        "on small requests; kept as a fallback).",
    )
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Worker processes, or auto: one per two CPUs this process may use (at least "
        "one). With more than one, each worker's onnxruntime sessions get the CPUs divided "
        "between them unless intra_op_threads is set.",
    )
    model_repository: Path = Field(Path("models"), description="The model repository folder.")
    load_variants: bool = Field(
        True,
        description="Load every servable variant of each model (FP32, INT8, pruned, ...) so that "
        "requests can pick one; false loads only each model's default variant.",
    )

    providers: list[str] | None = Field(
        None,
        description="onnxruntime execution providers in order of preference; default: CUDA "
        "where available, then CPU.",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime intra-op threads per session (0: onnxruntime decides)."
    )
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime inter-op threads per session.")
    allow_spinning: bool = Field(
        False,
        description="Let idle onnxruntime threads spin. Off: spinning threads burn the second "
        "core that the HTTP loop needs (measured 15-25% slower at moderate load).",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level."
    )

    max_batch_size: int = Field(
        64, ge=1, description="Most samples merged into one onnxruntime call (per model)."
    )
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0.0,
        description="How long a batch may wait for more requests. 0: take whatever queued "
        "while the previous batch ran (no added latency at low load).",
    )
    inline_run_us: float = Field(
        400.0,
        ge=0.0,
        description="A request alone in its model's queue whose measured onnxruntime time is "
        "expected under this many microseconds runs on the event loop's thread instead of the "
        "model's onnxruntime thread: for a tiny model the hop costs more than the model "
        "(measured p50 0.48 -> 0.44 ms at one client on the digits CNN). Batches always run "
        "in the onnxruntime thread. 0: never on the loop.",
    )
    sequence_batching: Literal["bucket", "longest", "max"] = Field(
        "bucket",
        description="Text models: bucket groups texts by token count (16, 32, 64, ... up to "
        "the model's limit) and pads each batch to its longest member; longest lets any texts "
        "share a batch, padded to the longest; max pads every text to the model's limit.",
    )
    max_queue_size: int = Field(
        2048, ge=1, description="Most samples waiting per model; beyond it requests get 503."
    )
    request_timeout_s: float = Field(
        10.0, gt=0.0, description="A request not served by then gets 503 with Retry-After."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503 answers.")
    max_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Larger request bodies get 413 (gRPC: larger messages get RESOURCE_EXHAUSTED).",
    )

    max_connections: int = Field(
        4096,
        ge=1,
        description="Open HTTP connections per worker; a connection past it gets 503 and is "
        "closed at once.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="A request's headers must be complete this long after the connection "
        "opened or the request began; else 408 and the connection is closed.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="A request's body must be complete this long after its headers; else 408 "
        "and the connection is closed.",
    )
    keep_alive_s: int = Field(
        5, ge=1, description="An idle keep-alive connection is closed after this many seconds."
    )
    graceful_shutdown_s: int = Field(
        10,
        ge=1,
        description="On SIGTERM, requests in flight get this long to finish before workers "
        "are killed.",
    )
    backlog: int = Field(2048, ge=16, description="The listening socket's accept backlog.")

    model_control: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="none: the repository is read once at start; explicit: only the "
        "repository API loads and unloads; poll: the repository is also watched.",
    )
    repository_poll_s: float = Field(
        2.0, gt=0.0, description="How often poll mode looks at the repository."
    )
    startup_models: list[str] = Field(
        ["*"],
        description="explicit mode: the models loaded at start ('*': every one).",
    )
    memory_budget_mb: float = Field(
        0.0,
        ge=0.0,
        description="Most MiB of model files loaded at once; past it the least recently used "
        "idle models are evicted and loaded again on their next request. 0: no budget.",
    )
    shadow_max_pending: int = Field(
        64, ge=1, description="Shadow requests waiting at most; more are dropped (counted)."
    )
    runtime_dir: Path | None = Field(
        None,
        description="The server's private folder (set by the supervisor): workers share the "
        "repository API's load/unload/traffic state through it.",
    )

    # OpenTelemetry: the SDK's own variables (no SLIMSERVE_ prefix); tracing is off unless
    # they ask for an exporter or name an OTLP endpoint
    otel_traces_exporter: str | None = Field(
        None,
        validation_alias=AliasChoices("OTEL_TRACES_EXPORTER"),
        description="otlp or console to trace /v2 and the friendly endpoints; none (or unset "
        "without an OTLP endpoint): no tracing.",
    )
    otel_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
        description="Where OTLP spans go (HTTP/protobuf); setting it turns tracing on.",
    )
    otel_service_name: str = Field(
        "slimserve",
        validation_alias=AliasChoices("OTEL_SERVICE_NAME"),
        description="The service.name of the spans.",
    )

    def traces_exporter(self) -> str | None:
        """``otlp``, ``console`` or None (tracing off), from the OTel variables."""
        chosen = (self.otel_traces_exporter or "").strip().lower()
        if chosen in ("otlp", "console"):
            return chosen
        if not chosen and self.otel_endpoint:
            return "otlp"
        return None

    def worker_count(self) -> int:
        """How many worker processes to start: ``workers``, or for ``auto`` one per two CPUs
        (one for the event loop and JSON, one for onnxruntime; measured in
        ``loadtest/published/*-workers.md``)."""
        if self.workers == "auto":
            return max(1, usable_cpus() // 2)
        return self.workers

    def session_threads(self) -> int:
        """onnxruntime intra-op threads per session: ``intra_op_threads``; when that is 0
        (onnxruntime decides) and there are several workers, the usable CPUs divided between
        them, so that N workers do not each start a thread per core."""
        if self.intra_op_threads or self.worker_count() == 1:
            return self.intra_op_threads
        return max(1, usable_cpus() // self.worker_count())


class ModelGroup(BaseModel):
    """One Ray Serve deployment of models (``SLIMSERVE_RAY_GROUPS``): which models it serves
    (names or shell patterns such as ``text-*``) and, when it differs from the application's,
    how many replicas it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[str] = Field(min_length=1, description="Model names or shell patterns.")
    num_replicas: int | None = Field(None, ge=1, description="Fixed replicas of this group.")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve's autoscaling_config for this group."
    )


class RayServeSettings(BaseSettings):
    """The Ray Serve application (``make serve-ray``, :mod:`service.rayserve`): where it runs,
    how models are grouped into deployments and how each deployment scales. The replicas read
    every other setting (``SLIMSERVE_*``) like a worker does."""

    model_config = SettingsConfigDict(
        env_prefix="SLIMSERVE_RAY_", extra="ignore", populate_by_name=True
    )

    address: str | None = Field(
        None,
        validation_alias=AliasChoices("RAY_ADDRESS", "SLIMSERVE_RAY_ADDRESS"),
        description="A running Ray cluster to join (Ray's own RAY_ADDRESS); unset: start a "
        "local Ray and stop it on exit.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the local Ray it starts (unset: Ray counts them)."
    )
    host: str = Field("127.0.0.1", description="Address Ray Serve's HTTP proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of Ray Serve's HTTP proxy.")
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "EveryNode", description="Where Ray Serve runs HTTP proxies."
    )
    app_name: str = Field("slimserve", description="The Ray Serve application's name.")
    groups: dict[str, ModelGroup | list[str]] = Field(
        {},
        description="Deployments by name, each with its models (JSON); a model no group names "
        "is served by the group 'default'.",
    )
    num_replicas: int = Field(1, ge=1, description="Replicas of each group (no autoscaling).")
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Ray Serve's autoscaling_config for every group (JSON, for example "
        '{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}); replaces '
        "num_replicas.",
    )
    replica_cpus: float = Field(1.0, ge=0.0, description="CPUs Ray reserves per replica.")
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="Requests a replica takes at once; the batcher forms batches from them.",
    )
    router_replicas: int = Field(1, ge=1, description="Replicas of the ingress router.")
    metrics_push_s: float = Field(
        5.0, gt=0.0, description="How often each replica sends its metrics to /metrics."
    )


class ModelServing(BaseModel):
    """A model's own serving settings: the manifest's ``serving`` object, each field overriding
    the server-wide setting of the same name. Parsed when the model loads, so a bad value marks
    that model not ready with the reason instead of stopping the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_batch_size: int | None = Field(None, ge=1, description="Overrides max_batch_size.")
    max_queue_delay_ms: float | None = Field(
        None, ge=0.0, description="Overrides max_queue_delay_ms."
    )
    max_queue_size: int | None = Field(None, ge=1, description="Overrides max_queue_size.")
    version_policy: VersionPolicy | None = Field(
        None, description="Which versions serve (Triton's shape); default: the newest one."
    )
    traffic: Traffic | None = Field(None, description="Canary and shadow traffic.")

    @classmethod
    def parse(cls, raw: object, model: str) -> ModelServing:
        """The manifest's ``serving`` object; :class:`ValueError` naming the bad field."""
        try:
            return cls.model_validate(raw if raw is not None else {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'serving'}: {e['msg']} "
                f"(got {e['input']!r})"
                for e in exc.errors()
            )
            raise ValueError(
                f"model '{model}': manifest 'serving' is invalid: {problems}"
            ) from None

    def batching(self, defaults: Settings) -> tuple[int, float, int]:
        """``(max_batch_size, max_queue_delay_s, max_queue_size)`` with the server defaults
        filling what the model does not set."""
        delay_ms = self.max_queue_delay_ms
        return (
            self.max_batch_size if self.max_batch_size is not None else defaults.max_batch_size,
            (delay_ms if delay_ms is not None else defaults.max_queue_delay_ms) / 1000.0,
            self.max_queue_size if self.max_queue_size is not None else defaults.max_queue_size,
        )


@cache
def get_settings() -> Settings:
    return Settings()


@cache
def get_ray_settings() -> RayServeSettings:
    return RayServeSettings()
