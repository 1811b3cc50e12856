"""What every engine shares: the engine interface, a chunk's result, the split-in-halves search
for rejected rows, the ordered finish of a chunk's outputs, and read-ahead of the next chunk."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.datatypes import V2_TO_NUMPY

from ..errors import JobFailed
from ..model import ModelSpec
from ..readers import Chunk, Reader, RowError

ENGINES = ("local", "http", "ray")
CANDIDATE_BATCH_SIZES = (64, 256, 1024, 4096)
DEFAULT_HTTP_BATCH = 512


@dataclass
class Result:
    """One chunk's predictions: ``outputs[name][i]`` belongs to input row ``rows[i]``."""

    index: int
    start: int
    stop: int
    rows: np.ndarray
    ids: np.ndarray | None
    errors: list[RowError]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def predicted(self) -> int:
        return len(self.rows)


class RowsRejected(Exception):
    """The model (or server) refused a batch; splitting it finds the rows at fault.

    ``per_row``: a single row refused this way is a bad row (a 400); otherwise (a 413 for one
    row) the job cannot go on.
    """

    def __init__(self, message: str, per_row: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.per_row = per_row


def run_batches(
    call: Callable[[np.ndarray], list[np.ndarray]],
    x: np.ndarray,
    batch_size: int,
    names: list[str],
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """``call`` over ``x`` in batches; refused rows (by index into ``x``) with the reason."""
    # an explicit stack, not a recursive closure: a closure that calls itself is a reference
    # cycle, and would keep every chunk's array alive until the garbage collector ran
    pieces: list[list[np.ndarray]] = []
    failed: dict[int, str] = {}
    for lo in range(0, len(x), batch_size):
        todo = [(lo, min(lo + batch_size, len(x)))]
        while todo:
            a, b = todo.pop()
            try:
                pieces.append(call(x[a:b]))
            except RowsRejected as exc:
                if b - a > 1:
                    mid = (a + b) // 2
                    todo += [(mid, b), (a, mid)]  # the first half is popped first
                elif exc.per_row:
                    failed[a] = exc.message
                else:
                    raise JobFailed(exc.message) from None
    if not pieces:
        return {}, failed
    if len(pieces) == 1:
        return dict(zip(names, pieces[0], strict=True)), failed
    return {n: np.concatenate([p[i] for p in pieces]) for i, n in enumerate(names)}, failed


def finalize(
    chunk: Chunk, outputs: dict[str, np.ndarray], failed: dict[int, str], model: ModelSpec
) -> Result:
    """A chunk and its predictions as a :class:`Result` (refused rows become row errors)."""
    rows, ids, errors = chunk.rows, chunk.ids, list(chunk.errors)
    if failed:
        keep = np.ones(len(rows), bool)
        keep[list(failed)] = False
        for i, reason in failed.items():
            value = ids[i] if ids is not None else None
            value = value.item() if isinstance(value, np.generic) else value
            errors.append(RowError(int(rows[i]), value, reason))
        errors.sort(key=lambda e: e.row)
        rows = rows[keep]
        ids = ids[keep] if ids is not None else None
    shaped = {}
    for spec in model.outputs:
        if not len(rows):
            shape = (0, *[max(d, 0) for d in spec.shape[1:]])
            shaped[spec.name] = np.empty(shape, V2_TO_NUMPY[spec.datatype])
            continue
        value = outputs[spec.name]
        if value.ndim == 0 or value.shape[0] != len(rows):
            raise JobFailed(
                f"model '{model.name}': output '{spec.name}' has shape {list(value.shape)} for "
                f"{len(rows)} rows; batch jobs need one output row per input row"
            )
        shaped[spec.name] = value
    return Result(chunk.index, chunk.start, chunk.stop, rows, ids, errors, shaped)


def background_priority() -> None:
    """Lower this thread's scheduling priority (Linux: a thread is a task with its own nice).

    onnxruntime splits every run across its threads and waits for the slowest; a reader or
    writer thread that preempts one of them stalls the whole run. At a lower priority they
    run in the gaps instead. Where the platform cannot do it, nothing changes.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Prefetch:
    """Runs an iterator in a background thread, ``depth`` items ahead (reading while the
    model runs); an exception in the thread is raised to the consumer."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), daemon=True)
        self._thread.start()

    def _fill(self, source: Iterator[Any]) -> None:
        background_priority()
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Engine(ABC):
    name: str
    model: ModelSpec
    batch_size: int

    @abstractmethod
    def open(self) -> ModelSpec:
        """Load the model or reach the server; :class:`SetupError` when it cannot."""

    @abstractmethod
    def results(self, reader: Reader, first: int) -> Iterator[Result]:
        """Results of chunks ``first`` .. last, in order."""

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing
        pass

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "batch_size": self.batch_size}
