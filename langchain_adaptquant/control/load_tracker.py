"""LoadTracker: how many requests are in flight, and how fast and how often they come.

Every invocation enters :meth:`LoadTracker.track` (threads) or :meth:`LoadTracker.atrack` (asyncio).
The count is decremented in ``finally``, so an exception or a cancelled task never leaks a slot;
the policy would otherwise believe the machine is busier than it is forever.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

from langchain_adaptquant.errors import InvalidValueError


@dataclass(frozen=True)
class LoadStats:
    """A consistent copy of the tracker's counters at one instant."""

    active: int
    peak: int
    total: int
    errors: int
    cancelled: int
    rate_per_s: float  # exponentially weighted request arrival rate
    latency_p50_s: Optional[float]
    latency_p95_s: Optional[float]
    latency_p99_s: Optional[float]

    def to_dict(self) -> dict:
        return {
            "active_requests": self.active,
            "peak_requests": self.peak,
            "total_requests": self.total,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "rate_per_s": round(self.rate_per_s, 4),
            "latency_p50_s": self.latency_p50_s,
            "latency_p95_s": self.latency_p95_s,
            "latency_p99_s": self.latency_p99_s,
        }


def nearest_rank(sorted_values: Sequence[float], fraction: float) -> Optional[float]:
    """Nearest-rank percentile (an observed value, no interpolation); None when nothing was measured yet.

    The one percentile rule of the package: the tracker, the telemetry and the benchmarks report alike.
    """
    if not sorted_values:
        return None
    index = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[index]


class LoadTracker:
    """Thread- and asyncio-safe counters of requests in flight.

    ``rate_half_life_s`` sets how fast the arrival rate forgets: a burst counts fully at first
    and half as much ``rate_half_life_s`` later. Latencies of the last ``latency_window``
    requests give the percentiles.
    """

    def __init__(
        self,
        rate_half_life_s: float = 30.0,
        latency_window: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(rate_half_life_s, (int, float)) or not math.isfinite(rate_half_life_s) or rate_half_life_s <= 0:
            raise InvalidValueError("rate_half_life_s", rate_half_life_s, "a finite number of seconds > 0")
        if not isinstance(latency_window, int) or latency_window < 1:
            raise InvalidValueError("latency_window", latency_window, "an integer >= 1")
        self._lock = threading.Lock()
        self._clock = clock
        self._decay = math.log(2) / rate_half_life_s
        self._active = 0
        self._peak = 0
        self._total = 0
        self._errors = 0
        self._cancelled = 0
        self._rate_mass = 0.0  # sum of exp(-decay * age) over arrivals; rate = mass * decay
        self._rate_at = clock()
        self._latencies: deque[float] = deque(maxlen=latency_window)

    @property
    def active(self) -> int:
        return self._active

    def _arrive(self) -> float:
        now = self._clock()
        with self._lock:
            self._rate_mass = self._rate_mass * math.exp(-self._decay * (now - self._rate_at)) + 1.0
            self._rate_at = now
            self._active += 1
            self._total += 1
            self._peak = max(self._peak, self._active)
        return now

    def _leave(self, started: float, outcome: str) -> None:
        elapsed = self._clock() - started
        with self._lock:
            self._active -= 1
            if outcome == "error":
                self._errors += 1
            elif outcome == "cancelled":
                self._cancelled += 1
            else:
                self._latencies.append(elapsed)

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count one request in flight for the duration of the block (threads, sync code)."""
        started = self._arrive()
        outcome = "ok"
        try:
            yield
        except GeneratorExit:
            outcome = "cancelled"  # a stream closed by its consumer before the end
            raise
        except BaseException as error:
            outcome = "cancelled" if _is_cancellation(error) else "error"
            raise
        finally:
            self._leave(started, outcome)

    @asynccontextmanager
    async def atrack(self) -> AsyncIterator[None]:
        """Async form of :meth:`track`; a cancelled task is counted as cancelled, not as an error."""
        started = self._arrive()
        outcome = "ok"
        try:
            yield
        except BaseException as error:
            outcome = "cancelled" if _is_cancellation(error) else "error"
            raise
        finally:
            self._leave(started, outcome)

    def stats(self) -> LoadStats:
        now = self._clock()
        with self._lock:
            mass = self._rate_mass * math.exp(-self._decay * (now - self._rate_at))
            latencies = sorted(self._latencies)
            return LoadStats(
                active=self._active,
                peak=self._peak,
                total=self._total,
                errors=self._errors,
                cancelled=self._cancelled,
                rate_per_s=mass * self._decay,
                latency_p50_s=nearest_rank(latencies, 0.50),
                latency_p95_s=nearest_rank(latencies, 0.95),
                latency_p99_s=nearest_rank(latencies, 0.99),
            )


def _is_cancellation(error: BaseException) -> bool:
    import asyncio

    return isinstance(error, (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit))
