import asyncio
import threading

import pytest

from langchain_adaptquant import InvalidValueError, LoadTracker


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_threads_count_in_flight_and_peak():
    tracker = LoadTracker()
    inside = threading.Barrier(9)  # 8 workers + the test
    leave = threading.Event()

    def worker():
        with tracker.track():
            inside.wait()
            leave.wait()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    inside.wait(timeout=10)
    assert tracker.active == 8
    leave.set()
    for thread in threads:
        thread.join(timeout=10)
    stats = tracker.stats()
    assert (stats.active, stats.peak, stats.total, stats.errors) == (0, 8, 8, 0)


def test_exception_releases_the_slot_and_counts_an_error():
    tracker = LoadTracker()
    with pytest.raises(RuntimeError):
        with tracker.track():
            assert tracker.active == 1
            raise RuntimeError("boom")
    stats = tracker.stats()
    assert (stats.active, stats.errors, stats.total) == (0, 1, 1)
    assert stats.latency_p50_s is None  # failed requests do not pollute latency


def test_asyncio_tasks_and_cancellation_release_slots():
    tracker = LoadTracker()

    async def request(hold: asyncio.Event):
        async with tracker.atrack():
            await hold.wait()

    async def scenario():
        hold = asyncio.Event()
        tasks = [asyncio.create_task(request(hold)) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert tracker.active == 5
        tasks[0].cancel()
        await asyncio.sleep(0.01)
        assert tracker.active == 4
        hold.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)

    asyncio.run(scenario())
    stats = tracker.stats()
    assert (stats.active, stats.peak, stats.total, stats.cancelled, stats.errors) == (0, 5, 5, 1, 0)


def test_closed_generator_counts_as_cancelled():
    tracker = LoadTracker()

    def stream():
        with tracker.track():
            yield 1
            yield 2

    gen = stream()
    next(gen)
    assert tracker.active == 1
    gen.close()
    assert tracker.active == 0 and tracker.stats().cancelled == 1


def test_latency_percentiles_and_rate_decay():
    clock = ManualClock()
    tracker = LoadTracker(rate_half_life_s=10.0, clock=clock)
    for latency in range(1, 101):  # 1..100 seconds
        with tracker.track():
            clock.now += latency
        clock.now -= latency  # arrivals all at t=0 so the rate is easy to reason about
    stats = tracker.stats()
    assert (stats.latency_p50_s, stats.latency_p95_s, stats.latency_p99_s) == (50, 95, 99)
    rate_now = stats.rate_per_s
    clock.now += 10.0
    assert tracker.stats().rate_per_s == pytest.approx(rate_now / 2)


def test_bad_settings_are_rejected():
    with pytest.raises(InvalidValueError, match="rate_half_life_s"):
        LoadTracker(rate_half_life_s=0)
    with pytest.raises(InvalidValueError, match="latency_window"):
        LoadTracker(latency_window=0)
