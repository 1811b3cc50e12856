"""Models that change while the server runs: load, unload, reload, poll, evict.

Triton's model control modes (``SLIMSERVE_MODEL_CONTROL``): ``none`` reads the repository once
at start; ``explicit`` loads and unloads only through the repository API; ``poll`` does what the
API does and also watches the repository every ``SLIMSERVE_REPOSITORY_POLL_S``: a version folder
that appears complete is loaded, a removed one unloaded, a removed model dropped.

A switch never drops a request. The new version is loaded beside the old one in a thread
(sha256, sessions, a warm-up whose outputs must match the manifest: :mod:`.loader`), then the
model's routes are swapped in one assignment; requests that already hold the old version finish
on it, and it is closed once none is left. A version that fails any step is refused with its
reason (the repository index shows it, ``slimserve_model_loads_total{outcome="refused"}``
counts it) and whatever served before keeps serving.

With ``SLIMSERVE_MEMORY_BUDGET_MB`` a load that would pass the budget first evicts the least
recently used idle models; a request for an evicted model loads it again and waits (a cold
start, ``slimserve_model_cold_start_seconds``). With several workers, the repository API's
decisions reach every worker through a state file in the server's runtime folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..core.errors import InvalidInput, ModelNotFound, ServingError
from ..core.policies import Traffic
from ..core.repository import MANIFEST_FILE, RepositoryError
from ..core.settings import Settings
from .loader import READY, UNLOADING, LoadedVersion
from .metrics import metrics
from .store import ModelEntry, ModelStore

__all__ = ["Lifecycle", "ControlState"]

log = logging.getLogger("slimserve.lifecycle")

_CONTROL_FILE = "control.json"
_WATCH_S = 0.5


class ControlState:
    """The repository API's decisions, shared by the workers of one server: a JSON file in its
    runtime folder, rewritten under a lock, each change numbered."""

    def __init__(self, folder: Path | None) -> None:
        self.path = folder / _CONTROL_FILE if folder is not None else None
        self.seq = 0  # the newest change seen
        #: per model, the number of the last change applied here (each model's entry in the
        #: file holds its latest change only)
        self.applied: dict[str, int] = {}

    def read(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {"seq": 0, "models": {}}
        return dict(json.loads(self.path.read_text()))

    def record(self, name: str, change: dict[str, Any]) -> int:
        """Add ``change`` for ``name`` (the caller applies it here); its number."""
        if self.path is None:
            self.seq += 1
            self.applied[name] = self.seq
            return self.seq
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            state["seq"] += 1
            state["models"].setdefault(name, {}).update(change, seq=state["seq"])
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)
            self.applied[name] = int(state["seq"])
            return int(state["seq"])


class Lifecycle:
    def __init__(self, store: ModelStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.mode = settings.model_control
        self.control = ControlState(settings.runtime_dir)
        self._loads = ThreadPoolExecutor(1, thread_name_prefix="slimserve-load")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seen: dict[tuple[str, int], tuple[int, ...]] = {}  # poll: folder signatures
        self._started = False
        store.reload = self._reload

    # ------------------------------------------------------------------ start and stop

    def start_blocking(self) -> None:
        """The start-up load (before the worker serves): everything, or in explicit mode the
        models ``SLIMSERVE_STARTUP_MODELS`` names."""
        only = self.settings.startup_models if self.mode == "explicit" else None
        budget = self.settings.memory_budget_mb
        log.info(
            "model control: %s%s%s",
            self.mode,
            f", every {self.settings.repository_poll_s:g} s" if self.mode == "poll" else "",
            f"; memory budget {budget:g} MiB" if budget else "",
        )
        self.store.load_all(only)

    def ensure_tasks(self) -> None:
        """Start the repository watcher (poll mode) and the shared-state watcher on the
        worker's event loop (first request or lifespan)."""
        if self._started:
            return
        self._started = True
        if self.mode == "poll":
            self._spawn(self._watch(self.poll_once, self.settings.repository_poll_s))
        if self.control.path is not None:
            self._spawn(self._watch(self._apply_shared, _WATCH_S))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, step: Any, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await step()
            except Exception:  # a watcher must outlive one bad pass
                log.exception("model lifecycle: %s failed", getattr(step, "__name__", step))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._loads.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the repository API

    def _controllable(self, name: str) -> ModelEntry:
        if self.mode == "none":
            raise InvalidInput(
                "models are read once at start (SLIMSERVE_MODEL_CONTROL=none); start the server "
                "with SLIMSERVE_MODEL_CONTROL=explicit or poll to load and unload them"
            )
        entry = self.store.entries.get(name)
        if entry is None:
            if name not in self.store.repository.names():
                raise ModelNotFound(f"model {name[:64]!r} is not in the repository")
            entry = self.store.entries.setdefault(name, ModelEntry(name))
        return entry

    async def api_load(self, name: str) -> None:
        """``POST /v2/repository/models/{name}/load``: every worker loads it (400 with the
        reason when it is refused)."""
        self._controllable(name)
        self.control.record(name, {"loaded": True})
        await self.load(name, raise_refused=True)

    async def api_unload(self, name: str) -> None:
        self._controllable(name)
        self.control.record(name, {"loaded": False})
        await self.unload(name)

    async def api_traffic(self, name: str, traffic: Traffic | None) -> None:
        """Set (or with None, clear back to the manifest's) a model's traffic policy."""
        entry = self._controllable(name)
        raw = traffic.model_dump() if traffic is not None else None
        self.control.record(name, {"traffic": raw})
        self._set_traffic(entry, traffic)

    def _set_traffic(self, entry: ModelEntry, traffic: Traffic | None) -> None:
        entry.traffic_override = traffic is not None
        if traffic is None:
            self.store.wanted_versions(entry)  # back to the manifest's
        else:
            entry.traffic = traffic

    async def _apply_shared(self) -> None:
        """What other workers decided through the API, applied here too."""
        state = await asyncio.to_thread(self.control.read)
        if state["seq"] <= self.control.seq:
            return
        self.control.seq = state["seq"]
        for name, change in state["models"].items():
            if change.get("seq", 0) <= self.control.applied.get(name, 0):
                continue
            self.control.applied[name] = change["seq"]
            if "traffic" in change:
                raw = change["traffic"]
                entry = self.store.entries.setdefault(name, ModelEntry(name))
                self._set_traffic(entry, Traffic.model_validate(raw) if raw else None)
            if change.get("loaded") is True:
                await self.load(name)
            elif change.get("loaded") is False:
                await self.unload(name)

    # ------------------------------------------------------------------ load, unload, poll

    async def load(self, name: str, raise_refused: bool = False) -> list[LoadedVersion]:
        """Load the versions ``name``'s policy wants that are not serving, switch to them,
        retire what they replace. Refusals leave the previous routes in place."""
        entry = self.store.entries.setdefault(name, ModelEntry(name))
        async with entry.locked():
            wanted = await asyncio.to_thread(self.store.wanted_versions, entry)
            missing = [v for v in wanted if v not in entry.serving]
            if not missing:
                return []
            loop = asyncio.get_running_loop()
            entry.loading = loop.create_future()
            entry.pending = set(missing)
            try:
                await self._make_room(entry, missing)
                loaded: dict[int, LoadedVersion] = {}
                for v in missing:
                    loaded[v] = await loop.run_in_executor(
                        self._loads, self.store.loader.load, name, v
                    )
            finally:
                entry.pending = set()
                entry.loading.set_result(None)
                entry.loading = None
            retired = self.store.install(entry, loaded)
            for version in retired:
                self._spawn(self._retire(entry, version, "unloaded"))
        refused = [done for done in loaded.values() if done.state != READY]
        for done in loaded.values():
            if done.state == READY:
                log.info(
                    "model %s version %d serving (loaded in %.2f s)",
                    name,
                    done.version,
                    done.load_seconds,
                )
        if refused and raise_refused:
            reasons = "; ".join(f"version {r.version}: {r.reason}" for r in refused)
            raise InvalidInput(f"model '{name}' was not loaded: {reasons}")
        return list(loaded.values())

    async def unload(self, name: str, reason: str = "unloaded") -> None:
        entry = self.store.entries.get(name)
        if entry is None:
            return
        async with entry.locked():
            retired = [entry.versions[v] for v in entry.serving if v in entry.versions]
            entry.serving = ()
            entry.reason, entry.refused = reason, False
        for version in retired:
            await self._retire(entry, version, "unloaded" if reason == "unloaded" else "evicted")

    async def _retire(self, entry: ModelEntry, version: LoadedVersion, outcome: str) -> None:
        """Wait for the requests on ``version`` to finish (at most the request timeout and
        a grace), then close it."""
        version.state = UNLOADING
        deadline = time.monotonic() + self.settings.request_timeout_s + 5
        while time.monotonic() < deadline and (
            version.in_flight
            or not all(m.batcher is None or m.batcher.idle for m in version.variants)
        ):
            await asyncio.sleep(0.02)
        version.close()
        if version.version not in entry.serving:
            entry.versions.pop(version.version, None)
        metrics().model_loads.labels(entry.name, outcome).inc()
        metrics().sessions_open.set(_open_sessions())
        log.info("model %s version %d %s", entry.name, version.version, outcome)

    async def poll_once(self) -> None:
        """One look at the repository: new and changed models loaded, removed ones dropped."""
        names = await asyncio.to_thread(self.store.repository.names)
        for gone in [n for n in self.store.entries if n not in names]:
            await self.unload(gone, "removed from the repository")
            self.store.entries.pop(gone, None)
        for name in names:
            entry = self.store.entries.setdefault(name, ModelEntry(name))
            wanted = await asyncio.to_thread(self.store.wanted_versions, entry)
            fresh = [v for v in wanted if v not in entry.serving and self._complete(name, v)]
            if fresh or any(v not in wanted for v in entry.serving):
                await self.load(name)
                await self._drop_unwanted(entry, wanted)

    async def _drop_unwanted(self, entry: ModelEntry, wanted: list[int]) -> None:
        """Versions still routed that the policy (or the repository) no longer has."""
        async with entry.locked():
            stale = [v for v in entry.serving if v not in wanted]
            if not stale or len(stale) == len(entry.serving):
                return  # keep serving something rather than nothing
            entry.serving = tuple(v for v in entry.serving if v in wanted)
        for v in stale:
            self._spawn(self._retire(entry, entry.versions[v], "unloaded"))

    def _complete(self, name: str, version: int) -> bool:
        """A version folder is complete when its manifest and every file it lists are there
        at their listed sizes and unchanged since the last look; one refused is tried again
        only when its files change."""
        folder = self.store.repository.root / name / str(version)
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
            files = manifest.get("files", {})
            sizes = tuple(
                (folder / rel).stat().st_size if (folder / rel).exists() else -1 for rel in files
            )
            signature = ((folder / MANIFEST_FILE).stat().st_mtime_ns, *sizes)
            complete = all(s == files[rel]["bytes"] for s, rel in zip(sizes, files, strict=True))
        except (OSError, ValueError, KeyError, TypeError):
            return False
        key = (name, version)
        previous = self._seen.get(key)
        self._seen[key] = signature
        entry = self.store.entries.get(name)
        tried = entry is not None and version in entry.versions
        if tried and previous == signature:
            return False  # refused before, unchanged since
        return complete and (previous == signature or not tried)

    # ------------------------------------------------------------------ memory budget

    async def _make_room(self, entry: ModelEntry, versions: list[int]) -> None:
        budget = self.settings.memory_budget_mb * 2**20
        if not budget:
            return
        need = await asyncio.to_thread(lambda: sum(self._size(entry.name, v) for v in versions))
        while self._loaded_bytes() + need > budget:
            victim = self._least_recently_used(exclude=entry.name)
            if victim is None:
                return  # nothing idle to evict: load anyway (the budget is a target)
            other, version = victim
            log.info("memory budget: evicting model %s version %d", other.name, version.version)
            other.serving = tuple(v for v in other.serving if v != version.version)
            other.reason, other.refused = "evicted (SLIMSERVE_MEMORY_BUDGET_MB)", False
            other.evicted = True
            await self._retire(other, version, "evicted")

    def _size(self, name: str, version: int) -> int:
        try:
            manifest = self.store.repository.get(name, version).manifest
        except RepositoryError:
            return 0
        files = {v.file for v in manifest.variants.values() if v.file}
        return sum(manifest.files[f].bytes for f in files if f in manifest.files)

    def _loaded_bytes(self) -> int:
        return sum(
            v.bytes
            for e in self.store.entries.values()
            for v in e.versions.values()
            if v.state == READY
        )

    def _least_recently_used(self, exclude: str) -> tuple[ModelEntry, LoadedVersion] | None:
        idle = [
            (version.last_used, entry, version)
            for entry in self.store.entries.values()
            if entry.name != exclude and entry.loading is None
            for v in entry.serving
            if (version := entry.versions[v]).in_flight == 0
        ]
        if not idle:
            return None
        _, entry, version = min(idle, key=lambda t: t[0])
        return entry, version

    async def _reload(self, name: str) -> None:
        """A request for an evicted model: load it again (its caller waits)."""
        entry = self.store.entries.get(name)
        if entry is not None and entry.evicted:
            entry.evicted = False
            with contextlib.suppress(ServingError):
                await self.load(name)


def _open_sessions() -> int:
    from ..core.runtime import OrtSession

    return OrtSession.open_count
