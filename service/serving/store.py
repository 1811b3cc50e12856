"""The models this worker serves: every model of the repository, its versions, and which of
them answer.

A model's entry holds the versions it knows (loaded, or refused with the reason) and the ones
its version policy routes to, newest first. A version is one onnxruntime session and one
batcher per variant (:mod:`service.serving.loader`); the manifest's default variant answers
requests that name none, and ``name@variant`` (or the v2 request parameter ``variant``) picks
another. Routes change by swapping a tuple: a request that already holds a version finishes
there, and the version is closed once nothing runs on it (:mod:`service.serving.lifecycle`).
:meth:`ModelStore.acquire` is the one lookup every inference request makes; it also splits
traffic to a canary and brings an evicted model back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..core.errors import InvalidInput, ModelNotFound, ModelNotReady, ModelUnavailable
from ..core.logs import clip
from ..core.policies import Traffic, VersionPolicy
from ..core.repository import ModelRepository, RepositoryError
from ..core.settings import ModelServing, Settings
from ..core.validation import names
from .loader import READY, LoadedModel, LoadedVersion, VersionLoader
from .metrics import UNKNOWN_MODEL, metrics

__all__ = ["LoadedModel", "ModelEntry", "ModelStore", "VARIANT_SEPARATOR", "index"]

VARIANT_SEPARATOR = "@"

log = logging.getLogger("slimserve.models")


@dataclass
class ModelEntry:
    """One model of the repository in this worker."""

    name: str
    #: every version this worker knows: loaded and serving, loaded and draining, or refused
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    #: the versions requests go to, newest first (swapped whole, never edited in place)
    serving: tuple[int, ...] = ()
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    traffic: Traffic | None = None
    #: set at run time through the repository API: wins over the manifest's
    traffic_override: bool = False
    #: why nothing serves when nothing does ("unloaded", "evicted ...", a refusal)
    reason: str = "not loaded"
    #: the reason is a refusal: the repository must be fixed (no retry helps)
    refused: bool = False
    refused_versions: list[int] = field(default_factory=list)
    #: evicted for the memory budget: the next request loads it again
    evicted: bool = False
    #: a load of this model in progress (requests for an evicted model wait on it), and the
    #: versions it loads
    loading: asyncio.Future[None] | None = field(default=None, repr=False)
    pending: set[int] = field(default_factory=set)
    lock: asyncio.Lock | None = field(default=None, repr=False)

    def primary(self) -> LoadedVersion | None:
        """The newest serving version that is ready."""
        for v in self.serving:
            version = self.versions.get(v)
            if version is not None and version.state == READY:
                return version
        return None

    def locked(self) -> asyncio.Lock:
        if self.lock is None:
            self.lock = asyncio.Lock()
        return self.lock


class ModelStore:
    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self.loader = VersionLoader(repository, settings)
        self.entries: dict[str, ModelEntry] = {}
        self.random = random.Random()
        #: loads an evicted model again (set by the lifecycle; None: nothing is evicted)
        self.reload: Callable[[str], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ start-up (blocking)

    def load_all(self, only: list[str] | None = None) -> None:
        """Every model of the repository (``only`` these when given), its versions as its
        policy says: what a worker does before it serves."""
        for name in self.repository.names():
            for folder in self.repository.unpublished(name):
                log.warning(
                    "model %s: folder %s has no manifest.json, so it is not a version; skipped",
                    name,
                    self.loader.relative(str(folder)),
                )
            entry = self.entries.setdefault(name, ModelEntry(name))
            if only is not None and "*" not in only and name not in only:
                continue
            wanted = self.wanted_versions(entry)
            loaded = {v: self.loader.load(name, v) for v in wanted}
            self.install(entry, loaded)
        ready = sum(e.primary() is not None for e in self.entries.values())
        log.info("%d of %d models ready from %s", ready, len(self.entries), self.repository.root)

    def wanted_versions(self, entry: ModelEntry) -> list[int]:
        """The versions ``entry``'s policy routes to, from the newest manifest's policy."""
        try:
            available = self.repository.versions(entry.name)
        except RepositoryError:
            return []
        policy, traffic = self._policies(entry.name, max(available))
        entry.policy = policy
        if not entry.traffic_override:
            entry.traffic = traffic
        return policy.choose(available)

    def _policies(self, name: str, newest: int) -> tuple[VersionPolicy, Traffic | None]:
        try:
            serving = ModelServing.parse(self.repository.get(name, newest).manifest.serving, name)
        except (RepositoryError, ValueError):
            return VersionPolicy(), None  # the version's own load reports what is wrong
        return serving.version_policy or VersionPolicy(), serving.traffic

    def install(self, entry: ModelEntry, loaded: dict[int, LoadedVersion]) -> list[LoadedVersion]:
        """Route ``entry`` to the ready ones of ``loaded`` (with the versions it already
        serves that the policy still wants); return the versions no longer routed, for the
        caller to drain and close. One swap: a request sees the old routes or the new."""
        entry.versions.update(loaded)
        wanted = set(loaded) | {v for v in entry.serving if v in entry.versions}
        wanted &= set(entry.policy.choose(list(entry.versions)))
        ready = [v for v in wanted if entry.versions[v].state == READY]
        if not ready and entry.serving:
            refused = [v for v in loaded.values() if v.state != READY]
            if refused:  # a new version failed: the old one keeps serving
                return []
        retired = [entry.versions[v] for v in entry.serving if v not in ready]
        entry.serving = tuple(sorted(ready, reverse=True))
        if entry.serving:
            entry.reason, entry.refused = "", False
        else:
            refused = [v for v in loaded.values() if v.reason]
            if len(refused) == 1:
                entry.reason, entry.refused = refused[0].reason, True
            elif refused:
                entry.reason = "; ".join(f"version {v.version}: {v.reason}" for v in refused)
                entry.refused = True
            entry.refused_versions = [v.version for v in refused]
        metrics().sessions_open.set(_open_sessions())
        return retired

    # ------------------------------------------------------------------ the per-request lookup

    def resolve(
        self, name: str, version: str | None = None, variant: str | None = None
    ) -> LoadedModel:
        """``name`` (or ``name@variant``), the version the URL names, the variant a request
        parameter names: the variant that answers. 404 for an unknown model, version or
        variant; 400 when the name and the parameter disagree, or the model failed to load;
        503 while it loads."""
        base, pinned = _split(name, variant)
        entry = self._entry(base)
        loaded = self._version(entry, version)
        wanted = pinned or variant
        model = loaded.default
        assert model is not None
        return model if not wanted or wanted == model.variant else _sibling(model, wanted)

    async def acquire(
        self, name: str, version: str | None = None, variant: str | None = None
    ) -> LoadedModel:
        """:meth:`resolve` for a request about to run: a canary takes its share of requests
        that name no version or variant, and an evicted model is loaded again first (the
        wait is recorded as a cold start)."""
        base, pinned = _split(name, variant)
        entry = self._entry(base)
        if entry.primary() is None and (entry.evicted or entry.loading is not None):
            started = time.perf_counter()
            if entry.loading is not None:
                await asyncio.shield(entry.loading)
            elif self.reload is not None:
                await self.reload(base)
            metrics().cold_start.labels(base).observe(time.perf_counter() - started)
        if version is None and not (pinned or variant):
            canary = self._canary(entry)
            if canary is not None:
                return canary
        return self.resolve(name, version, variant)

    def _canary(self, entry: ModelEntry) -> LoadedModel | None:
        traffic = entry.traffic
        if traffic is None or traffic.canary is None or traffic.canary_weight <= 0:
            return None
        if self.random.random() >= traffic.canary_weight:
            return None
        try:
            return self.target(entry, traffic.canary)
        except (ModelNotFound, ModelUnavailable, ModelNotReady):
            return None  # a canary that is not there: the primary answers

    def target(self, entry: ModelEntry, target: object) -> LoadedModel:
        """The variant a traffic target (another version, or another variant) names."""
        version = getattr(target, "version", None)
        variant = getattr(target, "variant", None)
        loaded = self._version(entry, None if version is None else str(version))
        assert loaded.default is not None
        return loaded.default if variant is None else _sibling(loaded.default, variant)

    def _entry(self, base: str) -> ModelEntry:
        entry = self.entries.get(base)
        if entry is None:
            raise ModelNotFound(
                f"model {clip(base, 64)!r} is not served here ({len(self.entries)} models; "
                "POST /v2/repository/index lists them)"
            )
        return entry

    def _version(self, entry: ModelEntry, version: str | None) -> LoadedVersion:
        if version is not None:
            loaded = entry.versions.get(int(version)) if version.isdigit() else None
            if loaded is not None and loaded.version in entry.serving:
                return loaded
            raise ModelNotFound(
                f"model '{entry.name}' has no version {clip(version, 32)!r} loaded "
                f"(serving versions {list(entry.serving) or 'none'})"
            )
        primary = entry.primary()
        if primary is not None:
            return primary
        if entry.loading is not None:
            raise ModelNotReady(
                f"model '{entry.name}' is loading; retry later", self.settings.retry_after_s
            )
        if entry.refused:
            which = ", ".join(str(v) for v in entry.refused_versions)
            plural = "s" if len(entry.refused_versions) > 1 else ""
            raise ModelUnavailable(
                f"model '{entry.name}' version{plural} {which} failed to load and will not be "
                f"served until its repository folder is fixed: {entry.reason}"
            )
        raise ModelUnavailable(f"model '{entry.name}' is not loaded: {entry.reason}")

    # ------------------------------------------------------------------ what clients see

    @property
    def models(self) -> dict[str, LoadedModel]:
        """Each model's default variant of its newest serving version, or a stand-in that
        says why it does not serve."""
        out = {}
        for name, entry in self.entries.items():
            primary = entry.primary()
            if primary is not None and primary.default is not None:
                out[name] = primary.default
            else:
                out[name] = LoadedModel(name, max(entry.versions, default=None), "fp32")
                out[name].error = entry.reason
        return out

    def labels(self, name: str) -> tuple[str, str, str]:
        """Metric labels for a request naming ``name``, before it is resolved: the model's
        default variant, or the one ``unknown`` value (an unknown name adds no series)."""
        entry = self.entries.get(name.partition(VARIANT_SEPARATOR)[0])
        if entry is None:
            return UNKNOWN_MODEL, "", ""
        primary = entry.primary()
        if primary is not None and primary.default is not None:
            return primary.default.labels
        return entry.name, "", ""

    async def close(self) -> None:
        for entry in self.entries.values():
            for loaded in entry.versions.values():
                loaded.close()


def _split(name: str, variant: object) -> tuple[str, str]:
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
    return base, pinned


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
        f"model '{model.name}' has no variant {clip(variant, 64)!r} (served variants: {servable})"
    )


def _open_sessions() -> int:
    from ..core.runtime import OrtSession

    return OrtSession.open_count


def index(store: ModelStore, ready_only: bool = False) -> list[dict[str, str]]:
    """The repository extension's index: every model, each version it knows with its state
    (READY, LOADING, UNLOADING, UNAVAILABLE) and the reason; a model with none, its reason."""
    rows: list[dict[str, str]] = []
    for name in sorted(store.entries):
        entry = store.entries[name]
        versions = sorted(set(entry.versions) | entry.pending)
        for v in versions:
            loaded = entry.versions.get(v)
            if v in entry.pending and (loaded is None or v not in entry.serving):
                state, reason = "LOADING", ""
            elif loaded is not None and v in entry.serving and loaded.state == READY:
                state, reason = READY, ""
            elif loaded is not None and loaded.state == "UNLOADING":
                state, reason = "UNLOADING", "replaced or unloaded; finishing its requests"
            else:
                state = "UNAVAILABLE"
                reason = (loaded.reason if loaded is not None else "") or entry.reason
            rows.append({"name": name, "version": str(v), "state": state, "reason": reason})
        if not versions:
            rows.append({"name": name, "state": "UNAVAILABLE", "reason": entry.reason})
    return [r for r in rows if r["state"] == READY] if ready_only else rows
