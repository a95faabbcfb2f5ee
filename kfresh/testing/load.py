"""A small grpc.aio load driver: closed-loop workers bounded in count and time, and a paced ingest stream.

No ghz here (FIELD-NOTES), so this is ours: `closed_loop` runs `concurrency` workers that each take the
next request index until `total` are issued or `time_limit_s` passes; every call records its own sample.
Loopback only: the suites pass 127.0.0.1 addresses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class LoadRun:
    samples: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    issued: int = 0


async def closed_loop(
    call: Callable[[int], Awaitable[T]], *, concurrency: int, total: int, time_limit_s: float
) -> LoadRun:
    """Run call(0..total-1) with `concurrency` in flight; stop issuing after `time_limit_s`."""
    run = LoadRun()
    counter = iter(range(total))
    deadline = time.perf_counter() + time_limit_s

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            run.issued += 1
            try:
                run.samples.append(await call(i))
            except Exception as exc:
                run.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - start
    return run


def paced(items: Iterator[T], rate_per_s: float, stop: threading.Event) -> Iterator[T]:
    """Yield items at a steady `rate_per_s` (no catch-up bursts) until `stop` is set."""
    interval = 1.0 / rate_per_s
    next_at = time.perf_counter()
    for item in items:
        if stop.is_set():
            return
        wait = next_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        else:
            next_at = time.perf_counter()
        next_at += interval
        yield item


class BackgroundIngest:
    """A thread streaming documents into a server at a fixed rate over one Ingest stream (the sustained load)."""

    def __init__(self, addr: str, docs: Iterator[object], rate_per_s: float) -> None:
        self.addr, self.rate = addr, rate_per_s
        self.acked = 0
        self.error: str | None = None
        self._docs = docs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load", daemon=True)
        self.started_at = self.stopped_at = 0.0

    def _run(self) -> None:
        from kfresh.testing.servers import client as connect

        self.started_at = time.perf_counter()
        try:
            with connect(self.addr) as client:
                for _ack in client.ingest(paced(self._docs, self.rate, self._stop)):
                    self.acked += 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:300]
        self.stopped_at = time.perf_counter()

    def __enter__(self) -> BackgroundIngest:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    @property
    def achieved_rate(self) -> float:
        end = self.stopped_at or time.perf_counter()
        return self.acked / max(end - self.started_at, 1e-9)
