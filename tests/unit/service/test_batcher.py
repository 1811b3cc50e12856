from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.core.errors import DeadlineExceeded, InvalidInput, Overloaded
from service.serving.batcher import BatchObserver, DynamicBatcher


class Recorder:
    """A fake model: doubles its input and records the batch sizes it was called with."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[int] = []
        self.delay = delay

    def __call__(self, feeds):
        x = feeds["x"]
        self.calls.append(len(x))
        if self.delay:
            time.sleep(self.delay)
        return [x * 2, x.sum(axis=1)]


def test_concurrent_mixed_size_requests_are_merged_and_answered_correctly() -> None:
    model = Recorder(delay=0.002)
    batches: list[int] = []
    batcher = DynamicBatcher(
        model, "m", max_batch_size=16, observer=BatchObserver(batch=lambda n, s: batches.append(n))
    )
    rng = np.random.default_rng(0)
    requests = [rng.random((int(rng.integers(1, 6)), 3)).astype(np.float32) for _ in range(200)]

    async def main():
        return await asyncio.gather(*(batcher.infer({"x": r}, len(r), 10.0) for r in requests))

    results = asyncio.run(main())
    for r, (doubled, sums) in zip(requests, results, strict=True):
        assert np.array_equal(doubled, r * 2)
        assert np.allclose(sums, r.sum(axis=1))
    assert sum(model.calls) == sum(len(r) for r in requests)
    assert len(model.calls) < len(requests) / 3  # requests really were merged
    assert max(model.calls) <= 16 and batches == model.calls


def test_a_request_larger_than_the_batch_is_split_and_reassembled_in_order() -> None:
    model = Recorder()
    batcher = DynamicBatcher(model, "m", max_batch_size=8)
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    doubled, sums = asyncio.run(batcher.infer({"x": x}, 20, 10.0))
    assert np.array_equal(doubled, x * 2) and sums.shape == (20,)
    assert sorted(model.calls) == [4, 8, 8]


def test_incompatible_shapes_are_not_merged() -> None:
    model = Recorder(delay=0.01)
    batcher = DynamicBatcher(model, "m", max_batch_size=64)

    async def main():
        a = np.ones((2, 3), np.float32)
        b = np.ones((2, 5), np.float32)
        return await asyncio.gather(*(batcher.infer({"x": v}, 2, 10.0) for v in (a, b, a, b, a)))

    results = asyncio.run(main())
    assert [r[0].shape[1] for r in results] == [3, 5, 3, 5, 3]


def test_full_queue_is_refused_with_503_and_retry_after() -> None:
    gate = threading.Event()

    def blocked(feeds):
        gate.wait(5)
        return [feeds["x"]]

    batcher = DynamicBatcher(blocked, "m", max_batch_size=4, max_queue_size=8, retry_after_s=2)

    async def main():
        x = np.ones((4, 1), np.float32)
        first = [asyncio.ensure_future(batcher.infer({"x": x}, 4, 10.0))]
        await asyncio.sleep(0.05)  # the first batch is running
        first += [asyncio.ensure_future(batcher.infer({"x": x}, 4, 10.0)) for _ in range(2)]
        await asyncio.sleep(0.01)  # two more queued = 8 samples
        with pytest.raises(Overloaded) as info:
            await batcher.infer({"x": x}, 4, 10.0)
        gate.set()
        await asyncio.gather(*first)
        return info.value

    error = asyncio.run(main())
    assert error.status_code == 503 and error.headers == {"Retry-After": "2"}
    assert "queue full (8 samples waiting, limit 8)" in str(error)


def test_a_request_that_waits_past_its_deadline_gets_503() -> None:
    model = Recorder(delay=0.3)
    batcher = DynamicBatcher(model, "m", max_batch_size=1)

    async def main():
        x = np.ones((1, 1), np.float32)
        slow = asyncio.ensure_future(batcher.infer({"x": x}, 1, 10.0))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded, match="past its deadline"):
            await batcher.infer({"x": x}, 1, 0.05)
        await slow

    asyncio.run(main())


def test_requests_that_cannot_meet_their_deadline_are_refused_up_front() -> None:
    model = Recorder(delay=0.05)
    batcher = DynamicBatcher(model, "m", max_batch_size=1)

    async def main():
        x = np.ones((1, 1), np.float32)
        await batcher.infer({"x": x}, 1, 10.0)  # learns ~50 ms per sample
        queued = [asyncio.ensure_future(batcher.infer({"x": x}, 1, 10.0)) for _ in range(5)]
        await asyncio.sleep(0)
        with pytest.raises(DeadlineExceeded, match="more than the"):
            await batcher.infer({"x": x}, 1, 0.1)
        await asyncio.gather(*queued)

    asyncio.run(main())


def test_a_client_error_reaches_every_request_of_the_batch_and_the_batcher_survives() -> None:
    def picky(feeds):
        if (feeds["x"] < 0).any():
            raise InvalidInput("negative input")
        return [feeds["x"]]

    batcher = DynamicBatcher(picky, "m", max_batch_size=8)

    async def main():
        with pytest.raises(InvalidInput, match="negative input"):
            await batcher.infer({"x": -np.ones((1, 1), np.float32)}, 1, 5.0)
        (out,) = await batcher.infer({"x": np.ones((2, 1), np.float32)}, 2, 5.0)
        return out

    assert asyncio.run(main()).shape == (2, 1)


def test_unexpected_failures_become_inference_failed() -> None:
    def broken(feeds):
        raise RuntimeError("boom")

    batcher = DynamicBatcher(broken, "m")

    async def main():
        await batcher.infer({"x": np.ones((1, 1), np.float32)}, 1, 5.0)

    with pytest.raises(Exception, match="model m: inference failed: boom") as info:
        asyncio.run(main())
    assert info.value.status_code == 500


def test_more_samples_than_the_queue_holds_is_413_not_retry_later() -> None:
    from service.core.errors import PayloadTooLarge

    batcher = DynamicBatcher(Recorder(), "m", max_batch_size=8, max_queue_size=32)
    x = np.ones((33, 3), np.float32)
    with pytest.raises(PayloadTooLarge, match="33 samples in one request, more than the 32") as e:
        asyncio.run(batcher.infer({"x": x}, 33, 10.0))
    assert e.value.status_code == 413 and "Retry-After" not in e.value.headers


def test_requests_whose_client_hung_up_never_reach_the_model() -> None:
    from service.core.errors import ClientClosedRequest

    gate = threading.Event()
    model = Recorder()

    def blocked(feeds):
        gate.wait(5)
        return model(feeds)

    batcher = DynamicBatcher(blocked, "m", max_batch_size=2)
    hung_up = {"a": False, "b": True, "c": True, "d": False}

    async def main():
        first = asyncio.ensure_future(batcher.infer({"x": np.ones((2, 3), np.float32)}, 2, 10.0))
        await asyncio.sleep(0.05)  # the first batch occupies the model
        rest = {
            k: asyncio.ensure_future(
                batcher.infer(
                    {"x": np.full((1, 3), i, np.float32)}, 1, 10.0, lambda k=k: hung_up[k]
                )
            )
            for i, k in enumerate(hung_up)
        }
        await asyncio.sleep(0.01)
        gate.set()
        await first
        return {k: await asyncio.gather(f, return_exceptions=True) for k, f in rest.items()}

    results = asyncio.run(main())
    assert isinstance(results["b"][0], ClientClosedRequest)
    assert isinstance(results["c"][0], ClientClosedRequest)
    assert results["a"][0][0].tolist() == [[0.0, 0.0, 0.0]]
    assert results["d"][0][0].tolist() == [[6.0, 6.0, 6.0]]
    assert model.calls == [2, 2]  # a and d ran together; b and c never did


def test_the_deadline_estimate_is_the_model_time_not_the_event_loop_lag() -> None:
    """A busy event loop delays when the batcher sees a batch finish; the estimate used to
    refuse requests must not count that delay (it once predicted 10 s for 0.3 s of work)."""
    batcher = DynamicBatcher(Recorder(delay=0.001), "m", max_batch_size=4)

    async def main():
        x = np.ones((4, 3), np.float32)
        for _ in range(5):
            task = asyncio.ensure_future(batcher.infer({"x": x}, 4, 10.0))
            await asyncio.sleep(0)
            time.sleep(0.05)  # the loop is busy while the model runs: 50 ms of lag
            await task
        return batcher._seconds_per_sample

    per_sample = asyncio.run(main())
    assert per_sample < 0.005  # about 1 ms / 4 samples, far from the 50 ms of lag


def test_a_full_queue_is_refused_before_the_request_is_read() -> None:
    """check_room answers for a request whose size is not known yet (before its body is
    decoded): under overload, what is shed costs no decoding."""
    gate = threading.Event()

    def blocked(feeds):
        gate.wait(5)
        return [feeds["x"]]

    batcher = DynamicBatcher(blocked, "m", max_batch_size=4, max_queue_size=8)

    async def main():
        x = np.ones((4, 1), np.float32)
        batcher.check_room(10.0)  # empty: room
        running = [asyncio.ensure_future(batcher.infer({"x": x}, 4, 10.0))]
        await asyncio.sleep(0.05)  # the first batch runs
        running += [asyncio.ensure_future(batcher.infer({"x": x}, 4, 10.0)) for _ in range(2)]
        await asyncio.sleep(0.01)  # 8 samples wait: full
        with pytest.raises(Overloaded, match="queue full"):
            batcher.check_room(10.0)
        gate.set()
        await asyncio.gather(*running)
        batcher.check_room(10.0)  # drained: room again

    asyncio.run(main())


class ThreadRecorder(Recorder):
    """Records which thread each call ran on."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay)
        self.threads: list[str] = []

    def __call__(self, feeds):
        self.threads.append(threading.current_thread().name)
        return super().__call__(feeds)


def test_a_tiny_model_runs_on_the_loop_once_measured_and_a_slow_one_never() -> None:
    fast, slow = ThreadRecorder(), ThreadRecorder(delay=0.003)
    tiny = DynamicBatcher(fast, "tiny", inline_run_s=0.002)
    heavy = DynamicBatcher(slow, "heavy", inline_run_s=0.002)
    x = np.ones((1, 3), np.float32)

    async def main() -> list[str]:
        loop_thread = threading.current_thread().name
        for batcher in (tiny, heavy):
            for _ in range(4):
                doubled, _ = await batcher.infer({"x": x}, 1, 10.0)
                assert np.array_equal(doubled, x * 2)
        # concurrent requests: still batched (running each at once on the loop would leave
        # nothing to batch), and batches run in the onnxruntime thread
        before = len(fast.calls)
        results = await asyncio.gather(*(tiny.infer({"x": x * i}, 1, 10.0) for i in range(50)))
        assert [float(r[0][0, 0]) for r in results] == [2.0 * i for i in range(50)]
        assert len(fast.calls) - before < 5 and sum(fast.calls[before:]) == 50
        assert all(t.startswith("ort-tiny") for t in fast.threads[before:])
        return [loop_thread]

    [loop_thread] = asyncio.run(main())
    assert fast.threads[0].startswith("ort-tiny")  # no measure yet: the thread
    assert set(fast.threads[1:4]) == {loop_thread}  # measured as tiny, alone: the loop's thread
    assert all(t.startswith("ort-heavy") for t in slow.threads)


def test_inline_runs_keep_failures_apart() -> None:
    calls = 0

    def flaky(feeds):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return [feeds["x"]]

    batcher = DynamicBatcher(flaky, "m", inline_run_s=1.0)
    x = np.ones((1, 3), np.float32)

    async def main() -> list[object]:
        out: list[object] = []
        for _ in range(5):
            try:
                out.append((await batcher.infer({"x": x}, 1, 10.0))[0].shape)
            except Exception as exc:  # noqa: BLE001 - recorded and checked below
                out.append(type(exc).__name__)
        return out

    assert asyncio.run(main()) == [(1, 3), (1, 3), "InferenceFailed", (1, 3), (1, 3)]
