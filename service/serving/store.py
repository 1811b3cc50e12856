"""Loaded models: one onnxruntime session and one batcher per model variant, from the repository.

Every servable variant of a model's latest version is loaded (FP32, INT8, pruned, ...); the
manifest's default variant answers requests that name none. A variant is addressed as
``name@variant`` (in a URL or a friendly endpoint's ``model``) or with the v2 request parameter
``variant``. A model that fails to load (corrupt file, hash mismatch, unreadable manifest, a graph
onnxruntime rejects, a ``serving`` object with a bad value) stays in the store as not ready,
with the reason; the others serve. :meth:`ModelStore.resolve` is the one lookup every request
makes; running a model is :mod:`service.serving.dataplane`'s business.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnxruntime as ort

from ..core.errors import InvalidInput, ModelNotFound, ModelUnavailable
from ..core.logs import clip
from ..core.repository import Manifest, ModelRepository, ModelVersion, RepositoryError
from ..core.runtime import ModelLoadError, OrtSession, RuntimeOptions
from ..core.settings import ModelServing, Settings
from ..core.validation import Expected, names
from .batcher import BatchObserver, DynamicBatcher
from .metrics import UNKNOWN_MODEL, metrics

__all__ = ["LoadedModel", "ModelStore", "VARIANT_SEPARATOR"]

VARIANT_SEPARATOR = "@"

log = logging.getLogger("slimserve.models")


@dataclass
class LoadedModel:
    name: str
    version: int | None
    variant: str
    manifest: Manifest | None = None
    session: OrtSession | None = None
    batcher: DynamicBatcher | None = None
    serving: ModelServing = field(default_factory=ModelServing)
    #: what a request must look like (inputs, most samples), checked before data is decoded
    expected: Expected | None = None
    #: why the model is not ready, with paths relative to the repository
    error: str | None = None
    #: every variant of this model version that is loaded (the default one included)
    siblings: dict[str, LoadedModel] = field(default_factory=dict, repr=False)
    #: variants that exist but are not served here, with the reason
    unservable: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def ready(self) -> bool:
        return self.session is not None

    @property
    def card(self) -> str | None:
        """The version's compression card (markdown), when the build wrote one."""
        if self.session is None:
            return None
        path = self.session.path.parent / "card.md"
        return path.read_text(encoding="utf-8") if path.is_file() else None

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
            for folder in self.repository.unpublished(name):
                log.warning(
                    "model %s: folder %s has no manifest.json, so it is not a version; skipped",
                    name,
                    self._relative(str(folder)),
                )
            self.models[name] = self._load(name, options)
        ready = sum(m.ready for m in self.models.values())
        log.info("%d of %d models ready from %s", ready, len(self.models), self.repository.root)

    def _load(self, name: str, options: RuntimeOptions) -> LoadedModel:
        """The default variant (or why it is not ready), with every other servable variant.
        Each variant's file is checked on its own: a corrupt INT8 file makes that variant
        unservable, not the model."""
        version = self.repository.versions(name)[-1]
        try:
            entry = self.repository.get(name, version)
            serving = ModelServing.parse(entry.manifest.serving, name)
        except (RepositoryError, ValueError) as exc:
            return self._not_ready(name, version, "fp32", exc)
        manifest = entry.manifest
        default = manifest.default_variant
        wanted = manifest.variants if self.settings.load_variants else {default: None}
        loaded: dict[str, LoadedModel] = {}
        unservable: dict[str, str] = {}
        for variant in wanted:
            why = self._unservable(manifest, variant, options)
            if why is None:
                try:
                    loaded[variant] = self._load_variant(entry, variant, serving, options)
                except (RepositoryError, ModelLoadError) as exc:
                    if variant == default:
                        return self._not_ready(name, version, variant, exc)
                    why = self._relative(str(exc))
                    log.error("model %s: variant %s is not served: %s", name, variant, exc)
            if why is not None:
                unservable[variant] = why
        if default not in loaded:
            why = unservable.get(default, "not loaded")
            return self._not_ready(name, version, default, RepositoryError(why))
        for model in loaded.values():
            model.siblings, model.unservable = loaded, unservable
        return loaded[default]

    def _load_variant(
        self, entry: ModelVersion, variant: str, serving: ModelServing, options: RuntimeOptions
    ) -> LoadedModel:
        """One variant: its file checked against the manifest's sha256, then its session."""
        manifest = entry.manifest
        entry.verify([manifest.variants[variant].file])
        label = f"{manifest.name}:{manifest.version}:{variant}"
        session = OrtSession(entry.variant_path(variant), label, options)
        model = LoadedModel(
            manifest.name, manifest.version, variant, manifest, session, serving=serving
        )
        model.batcher = self._batcher(model)
        model.expected = Expected.of(model.name, session.inputs, model.batcher.max_queue_size)
        m = metrics()
        m.load_seconds.labels(*model.labels).set(session.load_seconds)
        m.model_info.labels(*model.labels, session.provider).set(1)
        return model

    def _unservable(self, manifest: Manifest, variant: str, options: RuntimeOptions) -> str | None:
        entry = manifest.variants[variant]
        if not entry.file:
            return entry.reason or "the build produced no file"
        if entry.available:
            return None
        need = entry.requires_provider
        if need and need in ort.get_available_providers() and need in options.providers:
            return None  # built where it could not be measured (FP16 on a CPU machine)
        return entry.reason or "marked unavailable in the manifest"

    def _not_ready(self, name: str, version: int, variant: str, exc: Exception) -> LoadedModel:
        log.error("model %s version %s is not ready: %s", name, version, exc)
        model = LoadedModel(name, version, variant, error=self._relative(str(exc)))
        metrics().model_info.labels(*model.labels, "none").set(0)
        return model

    def _relative(self, message: str) -> str:
        """``message`` with the repository's absolute path cut off (clients see reasons; they
        need not learn where the server keeps its files)."""
        for root in {str(self.repository.root.resolve()), str(self.repository.root)}:
            message = message.replace(root + "/", "")
        return message

    def _batcher(self, model: LoadedModel) -> DynamicBatcher:
        assert model.session is not None
        max_batch_size, max_queue_delay_s, max_queue_size = model.serving.batching(self.settings)
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
            max_batch_size=max_batch_size,
            max_queue_delay_s=max_queue_delay_s,
            max_queue_size=max_queue_size,
            retry_after_s=self.settings.retry_after_s,
            splittable=splittable,
            observer=BatchObserver(queue_wait=queue.observe, batch=on_batch),
        )

    def resolve(
        self, name: str, version: str | None = None, variant: str | None = None
    ) -> LoadedModel:
        """The one lookup of a request: ``name`` (or ``name@variant``), the version the URL
        names, and the variant a request parameter names.

        404 for an unknown model, version or variant; 400 when the name and the parameter
        name different variants; 503 with the reason when the model failed to load.
        """
        base, _, pinned = name.partition(VARIANT_SEPARATOR)
        if variant is not None and (not isinstance(variant, str) or not variant):
            raise InvalidInput(
                f"request parameter 'variant' for model {clip(base, 64)!r}: expected a variant "
                f"name (string), got {clip(variant, 32)}"
            )
        if pinned and variant and pinned != variant:
            raise InvalidInput(
                f"model {clip(base, 64)!r}: the URL names variant {clip(pinned, 64)!r}, the "
                f"request parameter 'variant' names {clip(variant, 64)!r}; name one"
            )
        model = self.models.get(base)
        if model is None:
            raise ModelNotFound(
                f"model {clip(base, 64)!r} is not served here ({len(self.models)} models; "
                "POST /v2/repository/index lists them)"
            )
        if version is not None and version != str(model.version):
            raise ModelNotFound(
                f"model '{base}' has no version {clip(version, 32)!r} loaded "
                f"(serving version {model.version})"
            )
        if not model.ready:
            raise ModelUnavailable(
                f"model '{model.name}' version {model.version} failed to load and will not "
                f"be served until its repository folder is fixed: {model.error}"
            )
        wanted = pinned or variant
        return model if not wanted or wanted == model.variant else self._sibling(model, wanted)

    @staticmethod
    def _sibling(model: LoadedModel, variant: str) -> LoadedModel:
        """Another variant of the same model version; 404 naming the servable ones."""
        sibling = model.siblings.get(variant)
        if sibling is not None:
            return sibling
        servable = names(sorted(model.siblings))
        if variant in model.unservable:
            raise ModelNotFound(
                f"model '{model.name}' variant '{variant}' is not served here: "
                f"{model.unservable[variant]} (served variants: {servable})"
            )
        raise ModelNotFound(
            f"model '{model.name}' has no variant {clip(variant, 64)!r} "
            f"(served variants: {servable})"
        )

    def labels(self, name: str) -> tuple[str, str, str]:
        """Metric labels for a request naming ``name``, before it is resolved: the model's
        default variant, or the one ``unknown`` value (an unknown name adds no series)."""
        model = self.models.get(name.partition(VARIANT_SEPARATOR)[0])
        return model.labels if model is not None else (UNKNOWN_MODEL, "", "")

    async def close(self) -> None:
        for default in self.models.values():
            for model in default.siblings.values() or [default]:
                if model.batcher is not None:
                    await model.batcher.close()
