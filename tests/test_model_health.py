"""Health "" follows a remote vLLM server that goes down and comes back; `kfresh.v1.Kfresh` stays SERVING.

The remote is a stand-in that answers only /health and /v1/models: fault injection (it is stopped and
started again on the same port), not a model. Answers against a real `vllm serve` are in test_generation.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2
from server_helper import ServerHandle, server_config

from kfresh.client import SERVICE_NAME, KfreshClient
from kfresh.core.net import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _VllmStandIn(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = {"/health": b"", "/v1/models": json.dumps({"data": [{"id": "SmolLM2-135M-Instruct"}]}).encode()}.get(
            self.path
        )
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        return


def _up(port: int) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _VllmStandIn)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _down(httpd: ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()


def _until(check: Callable[[], bool], timeout_s: float = 15.0) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def test_model_health_follows_a_remote_server_down_and_back(engine_loop: Any, tmp_path: Path) -> None:
    port = free_port()
    remote = _up(port)
    cfg = server_config(tmp_path, generation__backend="remote", generation__remote_url=f"http://127.0.0.1:{port}",
                        generation__remote_health_interval_s=0.2, generation__remote_timeout_s=2.0)  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, None)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            _until(lambda: client.health("") == SERVING, 60)
            _down(remote)
            _until(lambda: client.health("") == NOT_SERVING)
            assert client.health(SERVICE_NAME) == SERVING  # ingest and retrieval do not need the model
            remote = _up(port)
            _until(lambda: client.health("") == SERVING)
            assert client.health(SERVICE_NAME) == SERVING
    finally:
        handle.stop()
        _down(remote)
