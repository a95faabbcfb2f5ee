"""A throwaway NATS JetStream server, and a `kfresh consume` process that can be killed and started again
(fault tests and the chaos suite). Needs Debian's `nats-server`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kfresh.core.net import free_port
from kfresh.testing.servers import flags, kill_group, stop_group, tail


def nats_bin() -> str | None:
    return shutil.which("nats-server")


@contextlib.contextmanager
def nats_server(store_dir: Path, timeout_s: float = 20.0) -> Iterator[str]:
    """`nats-server -js` on a free loopback port, its JetStream files under `store_dir`; yields its URL."""
    binary = nats_bin()
    if binary is None:
        raise RuntimeError("nats-server is not installed: apt-get install nats-server")
    port = free_port()
    proc = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not start (exit {proc.poll()})") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class Consumer:
    """`kfresh consume` into `addr`, in its own process group, its log appended to `log` across starts."""

    def __init__(self, addr: str, settings: Mapping[str, Any], log: Path) -> None:
        self.addr, self.settings, self.log = addr, dict(settings), log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with self.log.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kfresh.cli", "consume", "--addr", self.addr, *flags(self.settings)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL: whatever it had fetched and not acknowledged to NATS is delivered again after its restart."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            if self.proc.returncode not in (0, -signal.SIGTERM):
                raise RuntimeError(f"kfresh consume exited with {self.proc.returncode}:\n{tail(self.log)}")
            self.proc = None


async def backlog(url: str, stream: str, durable: str) -> int:
    """Messages of the durable consumer not yet acknowledged (undelivered + delivered and unacknowledged)."""
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    finally:
        await nc.close()
