"""LISTEN on the change channel from one dedicated connection, so waiters wake the moment any writer commits.

A daemon thread owns the listening connection and bumps a generation counter on every notification (and
on every (re)connect, since notifications sent while it was not listening are lost). A waiter remembers
the generation BEFORE it checks max_seq, then sleeps until the generation moves: a commit that lands
between the check and the sleep still wakes it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kfresh.indexer")

_SLICE_S = 0.25  # the thread re-checks its stop flag this often (bounds close())
_RETRY_S = 1.0  # pause before reconnecting a lost listening connection


class ChangeListener:
    """LISTEN `channel` on a connection from `connect()` (autocommit) in a daemon thread."""

    def __init__(self, connect: Callable[[], Any], channel: str, errors: type[BaseException]) -> None:
        self._connect = connect
        self._channel = channel
        self._errors = errors
        self._cond = threading.Condition()
        self._generation = 0
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kfresh-pg-listen", daemon=True)
        self._thread.start()

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def wait(self, generation: int, timeout_s: float) -> int:
        """Sleep until the generation differs from `generation` (or timeout); returns the current one."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != generation or self._stop.is_set(), timeout_s)
            return self._generation

    def stop(self) -> None:
        self._stop.set()
        self._bump()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * _SLICE_S)

    def _bump(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except self._errors as exc:
                self.listening.clear()
                log.warning("store.listen_failed %s: reconnecting in %.0f s", exc, _RETRY_S)
                self._stop.wait(_RETRY_S)

    def _listen(self) -> None:
        conn = self._connect()
        try:
            conn.execute(f"LISTEN {self._channel}")
            self.listening.set()
            self._bump()  # anything committed while not listening: let waiters re-check
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=_SLICE_S):
                    self._bump()
        finally:
            self.listening.clear()
            conn.close()
