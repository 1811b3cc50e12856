"""Dynamic batching: concurrent requests for one model merged into one onnxruntime call.

The queue is bounded (in samples) and every request has a deadline: a full queue, or a wait that
cannot end before the deadline, is refused at once with 503 rather than queued forever. By
default nothing waits on purpose: when the previous batch finishes, whatever queued meanwhile
becomes the next batch, so a lone client pays no batching delay. ``max_queue_delay_s`` adds a
Triton-style wait for fuller batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    InferenceFailed,
    Overloaded,
    ServingError,
)
from ..core.validation import check_samples
from .tracing import Trace

__all__ = ["BatchObserver", "DynamicBatcher"]

log = logging.getLogger("slimserve.batcher")

Feeds = dict[str, np.ndarray]


@dataclass
class BatchObserver:
    """Hooks for metrics: the queue wait of each request, and each batch's size and run time."""

    queue_wait: Callable[[float], None] = lambda seconds: None
    batch: Callable[[int, float], None] = lambda samples, seconds: None


@dataclass(slots=True)
class _Item:
    feeds: Feeds
    samples: int
    future: asyncio.Future
    deadline: float
    enqueued: float
    key: tuple = field(default=())
    #: whether the client of the request hung up (None: the transport cannot tell)
    gone: Callable[[], bool] | None = None
    #: when the request waited and ran, for its trace (None: not traced)
    trace: Trace | None = None


def _shape_key(feeds: Feeds) -> tuple:
    """Requests can share a batch only when everything but the batch axis matches."""
    return tuple((k, v.dtype.str, v.shape[1:]) for k, v in feeds.items())


def _merge(parts: list[Feeds], pad: Mapping[str, int]) -> Feeds:
    """One batch of the requests' feeds; sequence inputs padded to the longest first."""
    if len(parts) == 1:
        return parts[0]
    if pad:
        width = max(p[k].shape[1] for p in parts for k in pad if k in p)
        parts = [
            {
                k: np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=pad[k])
                if k in pad and v.shape[1] < width
                else v
                for k, v in p.items()
            }
            for p in parts
        ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[Feeds], list[np.ndarray]],
        label: str,
        max_batch_size: int = 64,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 2048,
        retry_after_s: int = 1,
        splittable: bool = True,
        observer: BatchObserver | None = None,
        inline_run_s: float = 0.0,
        pad: Mapping[str, int] | None = None,
    ) -> None:
        self._run = run
        #: inputs whose second axis is a sequence (token ids, masks) -> the value that pads
        #: them: requests of different lengths then share a batch, padded to its longest
        self.pad = dict(pad or {})
        self.label = label
        self.max_batch_size = max_batch_size if splittable else 1
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max(max_queue_size, max_batch_size)
        self.retry_after_s = retry_after_s
        self.splittable = splittable
        self.observer = observer or BatchObserver()
        self._queue: deque[_Item] = deque()
        self._queued_samples = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{label}")
        #: moving average of onnxruntime's own time per sample (measured in the worker thread,
        #: so event-loop lag under load does not inflate it), to refuse what cannot meet its
        #: deadline
        self._seconds_per_sample = 0.0
        self._running = False  # a batch is in onnxruntime now
        #: a lone request expected to take less than this runs on the event loop's own
        #: thread: for a tiny model the hop to the onnxruntime thread costs more than the run
        self.inline_run_s = inline_run_s

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    async def infer(
        self,
        feeds: Feeds,
        samples: int,
        timeout_s: float,
        gone: Callable[[], bool] | None = None,
        traces: list[Trace] | None = None,
        key: tuple | None = None,
    ) -> list[np.ndarray]:
        """Outputs for ``feeds`` (``samples`` rows), computed in some batch within ``timeout_s``.
        Requests share a batch when their ``key`` is equal (by default: every input's shape
        but the batch axis; sequences give their length bucket, see :attr:`pad`).

        413 when ``samples`` exceeds the queue itself (no retry can help), 503 when the queue is
        full or the deadline cannot be met now; a request whose client is ``gone`` by the time
        its batch is formed is dropped before onnxruntime (:class:`ClientClosedRequest`).
        With ``traces``, each queued part of the request appends its timings there.
        """
        check_samples(samples, self.max_queue_size, self.label)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.splittable and samples > self.max_batch_size:
            return await self._infer_split(feeds, samples, deadline, gone, traces, key)
        self._admit(samples, deadline - loop.time())
        if not self._queue and not self._running and not self.max_queue_delay_s:
            if not self._inline(samples):
                return await self._run_now(feeds, samples, loop, traces)
            if await self._alone():
                return await self._run_now(feeds, samples, loop, traces, inline=True)
        item = _Item(
            feeds,
            samples,
            loop.create_future(),
            deadline,
            loop.time(),
            _shape_key(feeds) if key is None else key,
            gone,
        )
        if traces is not None:
            item.trace = Trace(enqueued=time.time_ns())
            traces.append(item.trace)
        self._queue.append(item)
        self._queued_samples += samples
        self._ensure_worker()
        return await item.future

    async def _alone(self) -> bool:
        """Whether a request for a tiny model is alone after one turn of the event loop: the
        requests that arrived with it queue meanwhile (``_running`` holds them back), and when
        there are any it joins them in a batch, since running each on the loop in turn would
        leave nothing to batch."""
        self._running = True
        try:
            await asyncio.sleep(0)
        finally:
            self._running = False
        return not self._queue

    async def _run_now(
        self,
        feeds: Feeds,
        samples: int,
        loop: asyncio.AbstractEventLoop,
        traces: list[Trace] | None,
        inline: bool = False,
    ) -> list[np.ndarray]:
        """Nothing queued and nothing running: this request runs at once, without the batching
        task's hop (a lone client pays a thread hop at most, none with ``inline``). What
        queues meanwhile is batched as usual once it is done."""
        self._running = True
        self.observer.queue_wait(0.0)
        trace = None
        if traces is not None:
            trace = Trace(enqueued=time.time_ns())
            trace.batched = trace.enqueued
            traces.append(trace)
        try:
            if inline:  # a tiny model, nothing else waiting: no hop to the onnxruntime thread
                outputs, seconds, started = self._timed(feeds)
            else:
                outputs, seconds, started = await loop.run_in_executor(
                    self._executor, self._timed, feeds
                )
        except ServingError:
            raise
        except Exception as exc:  # onnxruntime failed on valid input: a server fault
            log.exception("model %s: a request of %d samples failed", self.label, samples)
            raise InferenceFailed(f"model {self.label}: inference failed: {exc}") from exc
        finally:
            self._running = False
            if self._queue:
                self._ensure_worker()
        self._observe(samples, seconds)
        if trace is not None:
            trace.run_start, trace.run_end = started, started + int(seconds * 1e9)
            trace.batch_samples = samples
        return outputs

    def _inline(self, samples: int) -> bool:
        """Whether ``samples``, alone, may run on the event loop's thread: the model's measured
        time says under ``inline_run_s`` (never before a first measure). Batches always run
        in the onnxruntime thread, so that the loop reads the next requests meanwhile."""
        expected = samples * self._seconds_per_sample
        return 0.0 < expected < self.inline_run_s

    def _observe(self, samples: int, seconds: float) -> None:
        self.observer.batch(samples, seconds)
        per_sample = seconds / samples
        self._seconds_per_sample = (
            per_sample
            if not self._seconds_per_sample
            else 0.9 * self._seconds_per_sample + 0.1 * per_sample
        )

    async def _infer_split(
        self,
        feeds: Feeds,
        samples: int,
        deadline: float,
        gone: Callable[[], bool] | None,
        traces: list[Trace] | None,
        key: tuple | None = None,
    ) -> list[np.ndarray]:
        """A request larger than the maximum batch: its chunks queue as separate requests."""
        self._admit(samples, deadline - asyncio.get_running_loop().time())
        step = self.max_batch_size
        parts = await asyncio.gather(
            *(
                self.infer(
                    {k: v[i : i + step] for k, v in feeds.items()},
                    min(step, samples - i),
                    deadline - asyncio.get_running_loop().time(),
                    gone,
                    traces,
                    key,
                )
                for i in range(0, samples, step)
            )
        )
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]

    def check_room(self, timeout_s: float) -> None:
        """Refuse a request before it is even read and decoded when the queue could not take
        a single sample now (full, or already longer than the deadline): under overload the
        server then spends almost nothing on what it sheds."""
        self._admit(1, timeout_s)

    def _admit(self, samples: int, remaining_s: float) -> None:
        if self._queued_samples + samples > self.max_queue_size:
            raise Overloaded(
                f"model {self.label}: queue full ({self._queued_samples} samples waiting, "
                f"limit {self.max_queue_size}); retry later",
                self.retry_after_s,
            )
        expected = (self._queued_samples + samples) * self._seconds_per_sample
        if expected > remaining_s:
            raise DeadlineExceeded(
                f"model {self.label}: {self._queued_samples} queued samples need about "
                f"{expected * 1000:.0f} ms, more than the {remaining_s * 1000:.0f} ms left "
                "before the request's deadline; retry later",
                self.retry_after_s,
            )

    def _ensure_worker(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._work(), name=self.label)
        assert self._wakeup is not None
        self._wakeup.set()

    def _take(self, now: float) -> list[_Item]:
        """Pop the next batch: the first live request and every compatible one that fits."""
        batch: list[_Item] = []
        kept: deque[_Item] = deque()
        total = 0
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # cancelled
                self._queued_samples -= item.samples
                continue
            if item.gone is not None and item.gone():  # the client hung up: do not run it
                self._queued_samples -= item.samples
                item.future.set_exception(
                    ClientClosedRequest(f"model {self.label}: the client hung up while queued")
                )
                continue
            if now > item.deadline:
                self._queued_samples -= item.samples
                item.future.set_exception(
                    DeadlineExceeded(
                        f"model {self.label}: request waited {(now - item.enqueued) * 1000:.0f} ms"
                        " in the queue, past its deadline; retry later",
                        self.retry_after_s,
                    )
                )
                continue
            joins = not batch or (
                item.key == batch[0].key and total + item.samples <= self.max_batch_size
            )
            if joins:
                batch.append(item)
                total += item.samples
                self._queued_samples -= item.samples
            else:
                kept.append(item)
            if total >= self.max_batch_size:
                break
        kept.extend(self._queue)
        self._queue = kept
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._queue or self._running:  # nothing to do, or a request runs at once
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_queue_delay_s > 0 and self._queued_samples < self.max_batch_size:
                wait = self._queue[0].enqueued + self.max_queue_delay_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            now = loop.time()
            batch = self._take(now)
            if not batch:
                continue
            batched_ns = time.time_ns()
            for item in batch:
                self.observer.queue_wait(now - item.enqueued)
                if item.trace is not None:
                    item.trace.batched = batched_ns
            await self._run_batch(batch, loop)

    async def _run_batch(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        merged = _merge([it.feeds for it in batch], self.pad)
        samples = sum(it.samples for it in batch)
        self._running = True
        try:
            outputs, seconds, started = await loop.run_in_executor(
                self._executor, self._timed, merged
            )
        except ServingError as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        except Exception as exc:  # the batcher must survive any failure of one batch
            log.exception("model %s: batch of %d samples failed", self.label, samples)
            failure = InferenceFailed(f"model {self.label}: inference failed: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            return
        finally:
            self._running = False
        self._observe(samples, seconds)
        for item in batch:
            if item.trace is not None:
                item.trace.run_start, item.trace.run_end = started, started + int(seconds * 1e9)
                item.trace.batch_samples = samples
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        offset = 0
        for item in batch:
            end = offset + item.samples
            if not item.future.done():
                item.future.set_result([o[offset:end] for o in outputs])
            offset = end

    def _timed(self, feeds: Feeds) -> tuple[list[np.ndarray], float, int]:
        """onnxruntime's run, its own duration and when it began (in the worker thread)."""
        started = time.time_ns()
        start = time.perf_counter()
        outputs = self._run(feeds)
        return outputs, time.perf_counter() - start, started

    def shutdown(self) -> None:
        """Stop the batching task and the onnxruntime thread (the queue must be empty)."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: safe to shut down."""
        return not self._queue and not self._running

    async def close(self) -> None:
        self.shutdown()
