"""SIGKILL of a real server subprocess in the middle of an ingest stream loses no acknowledged document."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.core.net import free_port

pytestmark = pytest.mark.slow


def _start(home: Path, port: int) -> subprocess.Popen[bytes]:
    # Retrieval-only server: the remote model is deliberately unreachable, ingest and Retrieve still work.
    cmd = [
        sys.executable,
        "-m",
        "kfresh.cli",
        "serve",
        "--server.port",
        str(port),
        "--store.path",
        str(home / "kfresh.db"),
        "--index.snapshot_dir",
        str(home / "index"),
        "--generation.backend",
        "remote",
        "--generation.remote_url",
        "http://127.0.0.1:9",
    ]
    log = open(home / f"server-{port}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _docs(n: int) -> Iterator:
    for i in range(n):
        yield document(
            f"crash-{i}", f"Crash note {i}: locker {i} holds the key numbered {i * 13 + 5}.", metadata={"n": str(i)}
        )


def test_sigkill_mid_stream_loses_no_acknowledged_document(tmp_path: Path) -> None:
    port = free_port()
    proc = _start(tmp_path, port)
    acked: list[str] = []
    try:
        with KfreshClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout=120, service=SERVICE_NAME)
            stream = client.ingest(_docs(400), timeout=120)
            with pytest.raises(grpc.RpcError):
                for ack in stream:
                    acked.append(ack.id)
                    if len(acked) == 80:
                        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert 80 <= len(acked) < 400

        port = free_port()
        proc = _start(tmp_path, port)
        with KfreshClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout=120, service=SERVICE_NAME)
            assert client.stats().documents >= len(acked)
            deadline = time.monotonic() + 60
            missing = set(acked)
            while missing and time.monotonic() < deadline:
                for doc_id in sorted(missing):
                    n = doc_id.split("-")[1]
                    chunks = client.retrieve(f"Crash note {n}: locker {n}", k=1, filter={"n": n}).chunks
                    if chunks and chunks[0].doc_id == doc_id:
                        missing.discard(doc_id)
                time.sleep(0.1)
            assert not missing, f"acknowledged but lost after SIGKILL: {sorted(missing)[:10]}"

            # The model never loads here: Answer says UNAVAILABLE at once, retrieval keeps working.
            with pytest.raises(grpc.RpcError) as err:
                list(client.answer("Which locker holds key 18?", timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # Graceful shutdown: SIGTERM drains and exits cleanly.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "level=INFO logger=kfresh.server stopped" in (tmp_path / f"server-{port}.log").read_text()
    finally:
        proc.kill()
        proc.wait(timeout=30)
