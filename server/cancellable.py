"""Blocking work off the event loop that stops early when its RPC goes away.

`asyncio.to_thread` cannot stop a thread: when the awaiting task is cancelled (the client cancelled, its
deadline passed, the server is stopping), the thread runs on to the end and its result is thrown away. Here the
function gets a `cancel` event that is set at that moment, and checks it between its stages
(`Indexer.search`: after waiting for a worker thread, after the query embedding, after the history refresh).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, cancel=<threading.Event>, **kwargs)` in a worker thread; the event is set when the awaiting
    task is cancelled, so `fn` can stop at its next check instead of running to the end."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(functools.partial(fn, *args, cancel=cancel, **kwargs))
    except asyncio.CancelledError:
        cancel.set()
        raise
