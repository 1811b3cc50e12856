"""Loading one version of a model, and checking it before anything is routed to it.

A version is loaded whole: its manifest read and its ``serving`` object parsed, each variant's
file checked against the manifest's sha256, an onnxruntime session and a batcher per variant,
then a warm-up: every variant runs one sample of zeros, and its outputs must have the names,
datatypes and shapes the manifest declares. A version that fails any step is refused with the
reason (paths relative to the repository) and nothing of it stays loaded; a variant that is
not the default can fail alone (the version then serves without it). Everything here blocks:
the lifecycle runs it in a thread, the event loop keeps serving.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from ..core.datatypes import from_numpy, to_numpy
from ..core.repository import (
    Manifest,
    ModelRepository,
    ModelVersion,
    RepositoryError,
    TensorSpec,
)
from ..core.runtime import ModelLoadError, OrtSession, RuntimeOptions
from ..core.settings import ModelServing, Settings
from ..core.tokenizer import TextEncoder, TokenizerSpec
from ..core.validation import Expected
from .batcher import BatchObserver, DynamicBatcher
from .metrics import Meters, metrics

__all__ = ["LoadedModel", "LoadedVersion", "VersionLoader", "LoadRefused"]

log = logging.getLogger("slimserve.models")

#: a version's states, as the repository index reports them (Triton's names)
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


class LoadRefused(Exception):
    """A version failed a step of loading; the message says which and why."""


@dataclass
class LoadedModel:
    """One variant of one loaded version: what a request runs on."""

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
    #: the version this variant belongs to (its state, requests in flight)
    owner: LoadedVersion | None = field(default=None, repr=False)
    #: its request metrics, bound to its labels
    meters: Meters | None = field(default=None, repr=False)
    #: text models: the tokenizer the server applies (the model then takes ``text``)
    text: TextEncoder | None = field(default=None, repr=False)

    @property
    def inputs(self) -> list[TensorSpec]:
        """What a request sends: the graph's inputs, or ``text`` for a text model."""
        if self.text is not None:
            return self.text.inputs
        return self.session.inputs if self.session is not None else []

    @property
    def ready(self) -> bool:
        return self.session is not None and (self.owner is None or self.owner.state == READY)

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


@dataclass
class LoadedVersion:
    """One version of a model: loaded (its default variant, the others as siblings), or
    refused with the reason. ``in_flight`` counts the requests running on it, so that an
    unloaded version is closed only once they are done."""

    name: str
    version: int
    default: LoadedModel | None = None
    state: str = READY
    reason: str = ""
    bytes: int = 0  # the loaded variants' files: what it costs against the memory budget
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0

    @property
    def variants(self) -> list[LoadedModel]:
        if self.default is None:
            return []
        return list(self.default.siblings.values()) or [self.default]

    def close(self) -> None:
        """Stop the batchers' tasks and threads and drop the sessions (call once drained)."""
        for model in self.variants:
            if model.batcher is not None:
                model.batcher.shutdown()
            if model.session is not None:
                model.session.close()
                metrics().model_info.labels(*model.labels, model.session.provider).set(0)


class VersionLoader:
    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self.options = RuntimeOptions.from_settings(settings)
        self.options.intra_op_threads = settings.session_threads()  # divided between workers

    def load(self, name: str, version: int) -> LoadedVersion:
        """``name`` at ``version``, checked and warmed up, or refused with the reason."""
        start = time.perf_counter()
        loaded: dict[str, LoadedModel] = {}
        try:
            entry = self.repository.get(name, version)
            serving = ModelServing.parse(entry.manifest.serving, name)
            unservable = self._variants(entry, serving, loaded)
        except (RepositoryError, ValueError, ModelLoadError, LoadRefused) as exc:
            for model in loaded.values():
                _release(model)
            reason = self.relative(str(exc))
            log.error("model %s version %s is refused: %s", name, version, reason)
            metrics().model_loads.labels(name, "refused").inc()
            return LoadedVersion(name, version, state=UNAVAILABLE, reason=reason)
        default = loaded[entry.manifest.default_variant]
        result = LoadedVersion(name, version, default)
        for model in loaded.values():
            model.siblings, model.unservable, model.owner = loaded, unservable, result
            result.bytes += model.session.path.stat().st_size if model.session else 0
        result.load_seconds = time.perf_counter() - start
        metrics().model_loads.labels(name, "loaded").inc()
        return result

    def _variants(
        self, entry: ModelVersion, serving: ModelServing, loaded: dict[str, LoadedModel]
    ) -> dict[str, str]:
        """Load every servable variant into ``loaded``; return the unservable ones' reasons.
        Raises when the default variant cannot serve."""
        manifest = entry.manifest
        default = manifest.default_variant
        wanted = manifest.variants if self.settings.load_variants else {default: None}
        unservable: dict[str, str] = {}
        for variant in wanted:
            why = self._unservable(manifest, variant)
            if why is None:
                try:
                    loaded[variant] = self._variant(entry, variant, serving)
                except (RepositoryError, ModelLoadError, LoadRefused) as exc:
                    if variant == default:
                        raise
                    why = self.relative(str(exc))
                    log.error("model %s: variant %s is not served: %s", entry.name, variant, why)
            if why is not None:
                unservable[variant] = why
        if default not in loaded:
            raise LoadRefused(unservable.get(default, f"default variant {default!r} not loaded"))
        return unservable

    def _variant(self, entry: ModelVersion, variant: str, serving: ModelServing) -> LoadedModel:
        """One variant: file checked against its sha256, session, batcher, warm-up."""
        manifest = entry.manifest
        entry.verify([manifest.variants[variant].file])
        label = f"{manifest.name}:{manifest.version}:{variant}"
        session = OrtSession(entry.variant_path(variant), label, self.options)
        model = LoadedModel(
            manifest.name, manifest.version, variant, manifest, session, serving=serving
        )
        try:
            warm_up(model)
            model.text = self._text(entry, session)
        except (LoadRefused, RepositoryError):
            session.close()
            raise
        model.batcher = self._batcher(model)
        model.expected = Expected.of(model.name, model.inputs, model.batcher.max_queue_size)
        model.meters = Meters(model.labels)
        m = metrics()
        m.load_seconds.labels(*model.labels).set(session.load_seconds)
        m.model_info.labels(*model.labels, session.provider).set(1)
        return model

    def _text(self, entry: ModelVersion, session: OrtSession) -> TextEncoder | None:
        """The tokenizer a text model declares, checked against its sha256 and its graph."""
        declared = entry.manifest.tokenizer
        if declared is None:
            return None
        try:
            spec = TokenizerSpec.parse(declared, entry.name)
            entry.verify([spec.file])
            encoder = TextEncoder(entry.path / spec.file, spec, entry.name)
        except ValueError as exc:
            raise LoadRefused(str(exc)) from None
        graph = {t.name: t for t in session.inputs}
        wanted = {spec.ids, spec.mask}
        if set(graph) != wanted or any(graph[n].datatype != "INT64" for n in wanted):
            raise LoadRefused(
                f"{session.path}: the tokenizer fills INT64 inputs {sorted(wanted)}, the graph "
                f"takes {[t.to_dict() for t in session.inputs]}"
            )
        return encoder

    def _unservable(self, manifest: Manifest, variant: str) -> str | None:
        entry = manifest.variants[variant]
        if not entry.file:
            return entry.reason or "the build produced no file"
        if entry.available:
            return None
        need = entry.requires_provider
        if need and need in ort.get_available_providers() and need in self.options.providers:
            return None  # built where it could not be measured (FP16 on a CPU machine)
        return entry.reason or "marked unavailable in the manifest"

    def relative(self, message: str) -> str:
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
            inline_run_s=self.settings.inline_run_us / 1e6,
            splittable=splittable,
            pad=model.text.pad if model.text is not None else None,
            observer=BatchObserver(queue_wait=queue.observe, batch=on_batch),
        )


def warm_up(model: LoadedModel) -> None:
    """One sample of zeros through the variant; its outputs must be what the manifest says
    (names, datatypes, shapes with -1 for dynamic axes). :class:`LoadRefused` otherwise."""
    assert model.session is not None and model.manifest is not None
    session = model.session
    feeds = {}
    for spec in session.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, dtype=to_numpy(spec.datatype))
    try:
        outputs = session.run(feeds)
    except Exception as exc:  # any failure on a valid sample: the version does not run
        raise LoadRefused(f"{session.path}: the warm-up sample failed: {exc}") from exc
    declared = {t.name: t for t in model.manifest.outputs}
    for name, value in zip(session.output_names, outputs, strict=True):
        want = declared.get(name)
        if want is None:
            continue  # a variant may add outputs the manifest does not list
        got = from_numpy(value.dtype)
        fits = len(value.shape) == len(want.shape) and all(
            d in (-1, g) for d, g in zip(want.shape, value.shape, strict=True)
        )
        if got != want.datatype or not fits:
            raise LoadRefused(
                f"{session.path}: output '{name}' is {got} {list(value.shape)} on a one-sample "
                f"warm-up; the manifest declares {want.datatype} {list(want.shape)}"
            )


def _release(model: LoadedModel) -> None:
    if model.batcher is not None:
        model.batcher.shutdown()
    if model.session is not None:
        model.session.close()
