"""How fresh the index is: ack -> searchable lags (bounded ring) and the recent ingest rate."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from kfresh.indexer.documents import LagStats


class LagRing:
    """The last `capacity` lags in milliseconds; percentiles over them."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._n = 0
        self._lock = threading.Lock()
        self._cached: tuple[int, LagStats] = (0, LagStats())  # stats() at record count n: polling is cheap

    def record(self, lag_ms: float) -> None:
        with self._lock:
            self._buf[self._n % len(self._buf)] = lag_ms
            self._n += 1

    def stats(self) -> LagStats:
        with self._lock:
            n = self._n
            if self._cached[0] == n:
                return self._cached[1]
            filled = self._buf[: min(n, len(self._buf))].copy()
        if not len(filled):
            return LagStats()
        p50, p95, p99 = np.percentile(filled, [50, 95, 99])
        stats = LagStats(p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99), max_ms=float(filled.max()),
                         count=len(filled))  # fmt: skip
        with self._lock:
            self._cached = (n, stats)
        return stats


class RateMeter:
    """Events per second over a sliding window (shorter while the meter is younger than the window)."""

    def __init__(self, window_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._started = clock()
        self._lock = threading.Lock()

    def record(self, n: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self._events.append((now, n))
            self._trim(now)

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._events)
        span = min(self.window_s, now - self._started)
        return total / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
