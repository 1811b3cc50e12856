"""Engines: what runs the model over a stream of chunks, answering in input order.

- ``local``: onnxruntime in this process (:class:`service.core.runtime.OrtSession`, the server's
  own session owner), the next chunk read in a background thread while this one runs.
- ``http``: a running slimserve over the v2 protocol with binary tensors, with bounded
  concurrency and retries with backoff on 503 and connection errors.
- ``ray``: Ray Data with an actor pool of onnxruntime sessions (``service.batch.ray_engine``,
  imported only when asked for, as Ray is an optional extra).

Every engine validates rows with :func:`service.core.protocol.validate_inputs` (in-process) or the
server's own validation (http). A batch the model refuses as invalid input is split in halves
until the refused rows are found; they become row errors and the rest is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from service.core.datatypes import V2_TO_NUMPY
from service.core.errors import InferenceFailed, InvalidInput
from service.core.protocol import (
    HEADER_LENGTH,
    InferRequest,
    decode_response,
    encode_request,
    validate_inputs,
)
from service.core.runtime import ModelLoadError, OrtSession, RuntimeOptions

from .errors import JobFailed, SetupError
from .model import ModelSpec, from_metadata
from .readers import Chunk, Reader, RowError

__all__ = [
    "ENGINES",
    "Result",
    "Engine",
    "LocalEngine",
    "HttpEngine",
    "RowsRejected",
    "run_batches",
    "finalize",
    "calibrate_batch_size",
]

log = logging.getLogger("slimserve.batch")

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


class _Prefetch:
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


# --------------------------------------------------------------------------------------------
# local: onnxruntime in this process


def calibrate_batch_size(
    session: OrtSession,
    model: ModelSpec,
    candidates: tuple[int, ...] = CANDIDATE_BATCH_SIZES,
    seconds_each: float = 0.15,
) -> int:
    """The candidate batch size with the most samples/s on this machine (about 0.5 s)."""
    rng = np.random.default_rng(0)
    best, best_rate = candidates[0], 0.0
    name = model.input.name
    for size in candidates:
        x = rng.random((size, *model.row_shape)).astype(model.dtype)
        session.run({name: x})  # warm-up: first runs allocate
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds_each or runs < 2:
            session.run({name: x})
            runs += 1
        rate = runs * size / elapsed
        log.debug("batch size %d: %.0f samples/s", size, rate)
        if rate > best_rate * 1.03:  # a bigger batch must be clearly faster to win
            best, best_rate = size, rate
    return best


class LocalEngine(Engine):
    name = "local"

    def __init__(
        self, model: ModelSpec, options: RuntimeOptions, batch_size: int | None = None
    ) -> None:
        self.model = model
        self.options = options
        self.requested_batch = batch_size
        self.batch_size = batch_size or 0
        self.session: OrtSession | None = None

    def open(self) -> ModelSpec:
        model = self.model
        assert model.path is not None
        try:
            self.session = OrtSession(model.path, model.label, self.options)
        except ModelLoadError as exc:
            raise SetupError(str(exc)) from None
        if self.session.inputs[0] != model.input:
            raise SetupError(
                f"model '{model.name}': the graph takes {self.session.inputs[0].to_dict()}, "
                f"its manifest says {model.input.to_dict()}"
            )
        fixed = model.fixed_batch
        if fixed is not None:
            self.batch_size = fixed
        elif not self.batch_size:
            self.batch_size = calibrate_batch_size(self.session, model)
        return model

    def results(self, reader: Reader, first: int) -> Iterator[Result]:
        chunks = _Prefetch(reader.chunks(first))
        try:
            for chunk in chunks:
                yield self.predict(chunk)
        finally:
            chunks.close()

    def predict(self, chunk: Chunk) -> Result:
        model = self.model
        assert self.session is not None
        names = self.session.output_names
        if not len(chunk.x):
            return finalize(chunk, {}, {}, model)
        request = InferRequest(
            {model.input.name: chunk.x}, {model.input.name: model.input.datatype}
        )
        try:
            validate_inputs(request, self.session.inputs, model.name)
        except InvalidInput as exc:  # the readers let only valid rows through
            raise JobFailed(f"rows {chunk.start}-{chunk.stop - 1}: {exc.message}") from exc
        outputs, failed = run_batches(self._call, chunk.x, self.batch_size, names)
        return finalize(chunk, outputs, failed, model)

    def _call(self, x: np.ndarray) -> list[np.ndarray]:
        assert self.session is not None
        pad = self.model.fixed_batch
        n = len(x)
        if pad is not None and n < pad:  # a graph with a fixed batch axis: fill, then cut
            x = np.concatenate([x, np.repeat(x[:1], pad - n, axis=0)])
        try:
            out = self.session.run({self.model.input.name: x})
        except InvalidInput as exc:
            raise RowsRejected(exc.message) from exc
        except InferenceFailed as exc:
            raise JobFailed(exc.message) from exc
        return [o[:n] for o in out] if pad is not None else out


# --------------------------------------------------------------------------------------------
# http: a running slimserve


class HttpEngine(Engine):
    """v2 infer requests with binary tensors, ``concurrency`` of them in flight."""

    name = "http"
    RETRY_STATUSES = (502, 503, 504)

    def __init__(
        self,
        url: str,
        model_name: str,
        version: int | None = None,
        variant: str | None = None,
        batch_size: int | None = None,
        concurrency: int = 4,
        retries: int = 5,
        timeout_s: float = 60.0,
        backoff_s: float = 0.5,
        local: ModelSpec | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.version = version
        self.variant = variant
        self.batch_size = batch_size or DEFAULT_HTTP_BATCH
        self.concurrency = concurrency
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.local = local
        self.retried = 0  # requests sent again after a 503 or a connection error
        self._stop = threading.Event()
        self._client: Any = None

    @property
    def _model_path(self) -> str:
        path = f"/v2/models/{self.model_name}"
        return path + (f"/versions/{self.version}" if self.version is not None else "")

    def open(self) -> ModelSpec:
        import httpx

        self._client = httpx.Client(
            base_url=self.url,
            timeout=self.timeout_s,
            limits=httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
        )
        try:
            answer = self._client.get(self._model_path)
        except httpx.HTTPError as exc:
            raise SetupError(
                f"no v2 server answers at {self.url} ({type(exc).__name__}: {exc}); start one "
                "(make serve) or pass --url"
            ) from None
        if answer.status_code != 200:
            raise SetupError(
                f"model '{self.model_name}' at {self.url}: {answer.status_code} "
                f"{_error_text(answer)}"
            )
        doc = answer.json()
        if self.variant is not None:
            variants = (doc.get("parameters") or {}).get("variants")
            if not isinstance(variants, dict):
                raise SetupError(
                    f"the server at {self.url} does not serve variants; drop --variant "
                    f"{self.variant}"
                )
            entry = variants.get(self.variant)
            served = sorted(k for k, v in variants.items() if v.get("served"))
            if not entry or not entry.get("served"):
                why = (entry or {}).get("reason") or "unknown variant"
                raise SetupError(
                    f"model '{self.model_name}' at {self.url}: variant {self.variant!r} is not "
                    f"served ({why}); served: {served}"
                )
        self.model = replace(from_metadata(doc, self.model_name, self.local), variant=self.variant)
        return self.model

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "concurrency": self.concurrency}

    def results(self, reader: Reader, first: int) -> Iterator[Result]:
        chunks = _Prefetch(reader.chunks(first))
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="slimserve-batch-http")
        pending: deque[tuple[Chunk, list[Future[Any]]]] = deque()
        try:
            for chunk in chunks:
                futures = [
                    pool.submit(self._rows, chunk.x[lo : lo + self.batch_size])
                    for lo in range(0, len(chunk.x), self.batch_size)
                ]
                pending.append((chunk, futures))
                while len(pending) > 2:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            chunks.close()

    def _collect(self, chunk: Chunk, futures: list[Future[Any]]) -> Result:
        names = [o.name for o in self.model.outputs]
        pieces: list[dict[str, np.ndarray]] = []
        failed: dict[int, str] = {}
        for k, future in enumerate(futures):
            outputs, refused = future.result()
            if outputs:
                pieces.append(outputs)
            failed.update({k * self.batch_size + i: r for i, r in refused.items()})
        outputs = {n: np.concatenate([p[n] for p in pieces]) for n in names} if pieces else {}
        return finalize(chunk, outputs, failed, self.model)

    def _rows(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        names = [o.name for o in self.model.outputs]
        return run_batches(self._call, x, len(x), names)

    def _call(self, x: np.ndarray) -> list[np.ndarray]:
        import httpx

        names = [o.name for o in self.model.outputs]
        params = {"variant": self.variant} if self.variant else None
        body, headers = encode_request({self.model.input.name: x}, names, True, params)
        path = f"{self._model_path}/infer"
        problem = ""
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise JobFailed("stopped")
            wait = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.0)
            try:
                answer = self._client.post(path, content=body, headers=headers)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = answer.status_code
                if status == 200:
                    return self._decode(answer, names, len(x))
                problem = f"{status} {_error_text(answer)}"
                if status == 400:
                    raise RowsRejected(f"the server refused the row: {_error_text(answer)}")
                if status == 413:
                    raise RowsRejected(f"{self.url}: {problem} (one row)", per_row=False)
                if status not in self.RETRY_STATUSES:
                    raise JobFailed(f"model '{self.model_name}' at {self.url}: {problem}")
                retry_after = answer.headers.get("retry-after", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            if attempt < self.retries:
                self.retried += 1
                log.info("retrying in %.2f s after %s", wait, problem)
                self._stop.wait(min(wait, 30.0))
        raise JobFailed(
            f"model '{self.model_name}' at {self.url}: gave up after {self.retries} retries; "
            f"last answer: {problem}"
        )

    def _decode(self, answer: Any, names: list[str], n: int) -> list[np.ndarray]:
        try:
            response = decode_response(answer.content, answer.headers.get(HEADER_LENGTH))
        except InvalidInput as exc:
            raise JobFailed(f"{self.url} sent a response that is not v2: {exc.message}") from None
        if self.variant and response.parameters.get("variant") not in (None, self.variant):
            raise JobFailed(
                f"{self.url} answered with variant {response.parameters.get('variant')!r}, "
                f"not {self.variant!r}"
            )
        missing = [name for name in names if name not in response.outputs]
        if missing:
            raise JobFailed(f"{self.url}: the response lacks outputs {missing}")
        return [response.outputs[name] for name in names]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _error_text(answer: Any) -> str:
    try:
        doc = answer.json()
    except ValueError:
        return answer.text[:200]
    return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)[:200]
