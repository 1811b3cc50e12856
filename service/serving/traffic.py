"""Shadow traffic: a copy of a fraction of requests goes to another version or variant after
the primary answered, and the two answers are compared, never returned.

Comparisons are per sample: the top-1 label for classifiers (a ``label`` output, or the
argmax of ``probabilities``), otherwise the largest absolute difference over the outputs both
share, within the policy's ``tolerance``. They are counted in
``slimserve_shadow_comparisons_total{model, shadow, outcome}`` with a histogram of each
request's largest difference, and kept as running figures that the model's metadata shows
beside each variant's offline accuracy. Shadow work runs off the caller's path, on a thread of
the lowest CPU priority with sessions of its own (see :class:`Shadows`), and is bounded: past
``SLIMSERVE_SHADOW_MAX_PENDING`` copies waiting, copies are dropped and counted, so a shadow can
never hold the primary back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ServingError
from ..core.policies import Traffic
from ..core.runtime import OrtSession, RuntimeOptions
from .metrics import metrics
from .store import LoadedModel, ModelEntry, ModelStore

__all__ = ["ShadowStats", "Shadows", "compare"]

log = logging.getLogger("slimserve.shadow")


@dataclass
class ShadowStats:
    """Running figures of one model's shadow since it was set."""

    target: str
    compared: int = 0
    agreed: int = 0
    dropped: int = 0
    failed: int = 0
    max_difference: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        rate = self.agreed / self.compared if self.compared else None
        return {
            "target": self.target,
            "compared_samples": self.compared,
            "agreement": rate,
            "dropped_requests": self.dropped,
            "failed_requests": self.failed,
            "max_abs_difference": self.max_difference,
        }


def compare(
    task: str, primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray], tolerance: float
) -> tuple[int, int, float]:
    """``(agreeing samples, disagreeing samples, largest absolute difference)``."""
    common = [k for k in primary if k in shadow and primary[k].shape == shadow[k].shape]
    difference = 0.0
    for k in common:
        if primary[k].dtype.kind in "fiu" and shadow[k].dtype.kind in "fiu" and primary[k].size:
            diff = np.abs(primary[k].astype(np.float64) - shadow[k].astype(np.float64))
            difference = max(difference, float(diff.max()))
    if "label" in common:
        same = primary["label"].reshape(len(primary["label"]), -1) == shadow["label"].reshape(
            len(shadow["label"]), -1
        )
        agree = int(same.all(axis=1).sum())
        return agree, len(same) - agree, difference
    if task == "classification" and "probabilities" in common:
        same = primary["probabilities"].argmax(axis=-1) == shadow["probabilities"].argmax(axis=-1)
        agree = int(np.asarray(same).sum())
        return agree, int(np.asarray(same).size) - agree, difference
    first = primary[common[0]] if common else None
    if first is None or first.ndim == 0:
        return 0, 0, difference
    samples = len(first)
    close = np.ones(samples, dtype=bool)
    for k in common:
        a, b = primary[k], shadow[k]
        if a.dtype.kind in "fiu" and len(a) == samples:
            gap = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(samples, -1)
            close &= gap.max(axis=1) <= tolerance
    agree = int(close.sum())
    return agree, samples - agree, difference


_SESSIONS = 4  # shadow sessions kept open at most (one per recent target)
_FLUSH_S = 0.5  # shadow counts reach Prometheus at most this often
_BATCH = 64  # copies run together at most


@dataclass
class _Copy:
    """One answered request, waiting for its shadow."""

    model: str
    label: str
    task: str
    tolerance: float
    path: Path
    inputs: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    stats: ShadowStats


class Shadows:
    """The shadow copies of one worker, offered after each answered request.

    They run on one thread of their own at the lowest CPU priority (nice 19), on sessions of
    their own with one intra-op thread, so that the shadow takes only the CPU the primary
    leaves: under load its backlog fills and copies are dropped (counted), the caller's
    answers are not slowed. The event loop only hands a copy over.
    """

    def __init__(self, store: ModelStore, max_pending: int, timeout_s: float) -> None:
        self.store = store
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.stats: dict[str, ShadowStats] = {}
        self._queue: queue.Queue[_Copy | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._sessions: dict[Path, OrtSession] = {}
        self._random = random.Random()
        self._unflushed: dict[tuple[str, str], list[Any]] = {}
        self._flushed = time.monotonic()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def offer(
        self,
        model: LoadedModel,
        inputs: dict[str, np.ndarray],
        samples: int,
        values: dict[str, np.ndarray],
        tokens: list[list[int]] | None = None,
    ) -> None:
        """Maybe send a copy of an answered request to the model's shadow (never raises); a
        text model's copy is its ``tokens``, padded here, only when there is a shadow."""
        entry = self.store.entries.get(model.name)
        traffic = entry.traffic if entry is not None else None
        if entry is None or traffic is None or traffic.shadow is None:
            return
        if traffic.shadow_fraction < 1.0 and self._random.random() >= traffic.shadow_fraction:
            return
        label = traffic.shadow.label
        stats = self._stats(entry, traffic)
        try:
            shadow = self.store.target(entry, traffic.shadow)
        except ServingError:
            stats.failed += 1
            metrics().shadow_comparisons.labels(entry.name, label, "failed").inc()
            return
        if shadow is model or shadow.session is None:
            return
        if tokens is not None and model.text is not None:
            inputs = model.text.feeds(tokens)
        task = model.manifest.task if model.manifest else "unknown"
        copy = _Copy(
            entry.name, label, task, traffic.tolerance, shadow.session.path, inputs, values, stats
        )
        try:
            self._queue.put_nowait(copy)
        except queue.Full:
            stats.dropped += 1
            metrics().shadow_comparisons.labels(entry.name, label, "dropped").inc()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="slimserve-shadow", daemon=True)
            self._thread.start()

    def _stats(self, entry: ModelEntry, traffic: Traffic) -> ShadowStats:
        target = str(traffic.shadow)
        stats = self.stats.get(entry.name)
        if stats is None or stats.target != target:
            stats = self.stats[entry.name] = ShadowStats(target)
        return stats

    def _work(self) -> None:
        """The shadow thread: lowest priority; the copies waiting are run as batches (one
        onnxruntime run and one comparison for each group of alike copies), which keeps its
        Python work, and so its hold on the interpreter lock, small under load."""
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            try:
                first = self._queue.get(timeout=_FLUSH_S)
            except queue.Empty:
                self._flush()
                continue
            copies = [first]
            while first is not None and len(copies) < _BATCH:
                try:
                    copies.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in copies
            for group in _alike([c for c in copies if c is not None]):
                try:
                    self._compare(group)
                except Exception as exc:  # a shadow never takes the worker down
                    head = group[0]
                    head.stats.failed += len(group)
                    m = metrics().shadow_comparisons
                    m.labels(head.model, head.label, "failed").inc(len(group))
                    log.debug("shadow %s of %s failed: %s", head.label, head.model, exc)
            if stop:
                self._flush()
                return

    def _compare(self, group: list[_Copy]) -> None:
        head = group[0]
        session = self._sessions.pop(head.path, None)
        if session is None:
            options = RuntimeOptions.from_settings(self.store.settings)
            options.intra_op_threads = 1  # the work stays on this low-priority thread
            session = OrtSession(head.path, "shadow", options)
        self._sessions[head.path] = session  # the most recently used last
        while len(self._sessions) > _SESSIONS:  # targets that changed: closed
            self._sessions.pop(next(iter(self._sessions))).close()
        if len(group) > 1 and not all(t.shape[:1] == (-1,) for t in session.inputs):
            for copy in group:  # no batch axis: one at a time
                self._compare([copy])
            return
        inputs = _stack([c.inputs for c in group])
        values = _stack([c.values for c in group])
        outputs = session.run(inputs)
        answer = dict(zip(session.output_names, outputs, strict=True))
        agree, disagree, difference = compare(head.task, values, answer, head.tolerance)
        stats = head.stats
        stats.compared += agree + disagree
        stats.agreed += agree
        stats.max_difference = max(stats.max_difference, difference)
        counts = self._unflushed.setdefault((head.model, head.label), [0, 0, []])
        counts[0] += agree
        counts[1] += disagree
        counts[2].append(difference)
        if time.monotonic() - self._flushed >= _FLUSH_S:
            self._flush()

    def _flush(self) -> None:
        """Counts into Prometheus at most every _FLUSH_S (each write takes the GIL and a
        lock: per copy it would slow the primary's requests)."""
        m = metrics()
        for (model, label), (agree, disagree, differences) in self._unflushed.items():
            m.shadow_comparisons.labels(model, label, "agree").inc(agree)
            m.shadow_comparisons.labels(model, label, "disagree").inc(disagree)
            histogram = m.shadow_difference.labels(model, label)
            for difference in differences:
                histogram.observe(difference)
        self._unflushed.clear()
        self._flushed = time.monotonic()

    async def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        for session in self._sessions.values():
            session.close()


def _alike(copies: list[_Copy]) -> list[list[_Copy]]:
    """Groups of copies that can run as one batch: same target, same stats, inputs of the
    same shapes but the first axis."""
    groups: dict[tuple[Any, ...], list[_Copy]] = {}
    for c in copies:
        shapes = tuple((k, v.dtype.str, v.shape[1:]) for k, v in c.inputs.items())
        groups.setdefault((c.path, id(c.stats), shapes), []).append(c)
    return list(groups.values())


def _stack(tensors: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(tensors) == 1:
        return tensors[0]
    return {k: np.concatenate([t[k] for t in tensors]) for k in tensors[0]}
