"""Loaded models: one onnxruntime session and one batcher per model, read from the repository.

A model that fails to load (corrupt file, hash mismatch, unreadable manifest, a graph
onnxruntime rejects) stays in the store as not ready, with the reason; the others serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .batcher import BatchObserver, DynamicBatcher
from .errors import ModelNotFound, ModelNotReady
from .metrics import metrics
from .protocol import InferRequest, validate_inputs
from .repository import Manifest, ModelRepository, RepositoryError
from .runtime import ModelLoadError, OrtSession, RuntimeOptions
from .settings import Settings

__all__ = ["LoadedModel", "ModelStore"]

log = logging.getLogger("slimserve.models")


@dataclass
class LoadedModel:
    name: str
    version: int | None
    variant: str
    manifest: Manifest | None = None
    session: OrtSession | None = None
    batcher: DynamicBatcher | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.session is not None

    @property
    def labels(self) -> tuple[str, str, str]:
        return self.name, str(self.version or ""), self.variant


class ModelStore:
    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self.models: dict[str, LoadedModel] = {}

    def load_all(self) -> None:
        options = RuntimeOptions.from_settings(self.settings)
        for name in self.repository.names():
            self.models[name] = self._load(name, options)
        ready = sum(m.ready for m in self.models.values())
        log.info("%d of %d models ready from %s", ready, len(self.models), self.repository.root)

    def _load(self, name: str, options: RuntimeOptions) -> LoadedModel:
        version = self.repository.versions(name)[-1]
        try:
            entry = self.repository.get(name, version)
            entry.verify()
            variant = entry.manifest.default_variant
            session = OrtSession(entry.variant_path(), f"{name}:{version}:{variant}", options)
        except (RepositoryError, ModelLoadError) as exc:
            log.error("model %s version %s is not ready: %s", name, version, exc)
            model = LoadedModel(name, version, "fp32", error=str(exc))
            metrics().model_info.labels(*model.labels, "none").set(0)
            return model
        model = LoadedModel(name, version, variant, entry.manifest, session)
        model.batcher = self._batcher(model)
        m = metrics()
        m.load_seconds.labels(*model.labels).set(session.load_seconds)
        m.model_info.labels(*model.labels, session.provider).set(1)
        return model

    def _batcher(self, model: LoadedModel) -> DynamicBatcher:
        assert model.session is not None and model.manifest is not None
        overrides = model.manifest.serving
        s = self.settings
        session = model.session
        splittable = all(t.shape and t.shape[0] == -1 for t in [*session.inputs, *session.outputs])
        m = metrics()
        labels = model.labels
        queue = m.queue_duration.labels(*labels)
        compute = m.compute_duration.labels(*labels)
        sizes = m.batch_size.labels(*labels)
        samples = m.samples.labels(*labels)
        executions = m.executions.labels(*labels)

        def on_batch(n: int, seconds: float) -> None:
            compute.observe(seconds)
            sizes.observe(n)
            samples.inc(n)
            executions.inc()

        return DynamicBatcher(
            session.run,
            f"{model.name}:{model.version}",
            max_batch_size=int(overrides.get("max_batch_size", s.max_batch_size)),
            max_queue_delay_s=float(overrides.get("max_queue_delay_ms", s.max_queue_delay_ms))
            / 1000.0,
            max_queue_size=int(overrides.get("max_queue_size", s.max_queue_size)),
            retry_after_s=s.retry_after_s,
            splittable=splittable,
            observer=BatchObserver(queue_wait=queue.observe, batch=on_batch),
        )

    def find(self, name: str, version: str | None = None) -> LoadedModel:
        """The model by name (and version, as in the URL); 404 when unknown."""
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model '{name}' is not served here (models: {known})")
        if version is not None and version != str(model.version):
            raise ModelNotFound(
                f"model '{name}' has no version '{version}' loaded "
                f"(serving version {model.version})"
            )
        return model

    def ready_model(self, name: str, version: str | None = None) -> LoadedModel:
        """Like :meth:`find`, and 503 with the reason when the model failed to load."""
        return self.require_ready(self.find(name, version))

    def require_ready(self, model: LoadedModel) -> LoadedModel:
        if not model.ready:
            raise ModelNotReady(
                f"model '{model.name}' version {model.version} is not ready: {model.error}",
                self.settings.retry_after_s,
            )
        return model

    async def infer(self, model: LoadedModel, request: InferRequest) -> dict[str, np.ndarray]:
        """validate -> batch -> onnxruntime: the one way every endpoint runs a model."""
        assert model.session is not None and model.batcher is not None
        samples = validate_inputs(request, model.session.inputs, model.name)
        outputs = await model.batcher.infer(
            request.inputs, samples, self.settings.request_timeout_s
        )
        return dict(zip(model.session.output_names, outputs, strict=True))

    async def close(self) -> None:
        for model in self.models.values():
            if model.batcher is not None:
                await model.batcher.close()
