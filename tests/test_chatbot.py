"""The chat example (examples/chatbot) in a real headless Chromium, against a real kfresh server and model.

The web app runs as `examples/chatbot/run.py --kfresh-addr ...` (its own process, talking gRPC only); the
browser asks, reads the streamed answer and its sources, watches the knowledge panel while the shop's
documents change (a price change, a superseding returns policy, a deleted product), votes, and meets the
page's error messages. Once over plain gRPC and once over TLS with a bearer token.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_helper import ServerHandle, server_config
from test_security import _pki

from kfresh.client import KfreshClient, tls_credentials

CHATBOT = Path(__file__).resolve().parents[1] / "examples" / "chatbot"
sys.path.insert(0, str(CHATBOT))

from browser import ChatPage, find_browser  # noqa: E402
from changes import apply, find_step  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_browser() is None, reason="no chromium + chromium-driver (.ci/run installs them)"),
]
WRITER = "chatbot-writer-9d3f6a1c2e7b4805"
MIN_SCORE = 0.38  # as run.py starts its own server


class WebApp:
    """`run.py` in its own process (output to a file); `url` once it printed it."""

    def __init__(self, *args: str, data: Path) -> None:
        cmd = [sys.executable, str(CHATBOT / "run.py"), "--port", "0", "--data", str(data), *args]
        self.log = data / f"webapp-{len(list(data.glob('webapp-*.log')))}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            if found := re.search(r"open (http://\S+)", self.log.read_text()):
                self.url = found.group(1)
                return
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("run.py did not serve:\n" + self.log.read_text())

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        return self.log.read_text()


@pytest.fixture(scope="module")
def plain_server(
    engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    cfg = server_config(tmp_path_factory.mktemp("chat"), answer__min_score=MIN_SCORE, answer__max_tokens=60)
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    yield handle
    handle.stop()


def test_a_customer_sees_answers_change_with_the_documents(plain_server: ServerHandle, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{plain_server.port}"
    app = WebApp("--kfresh-addr", addr, data=tmp_path)
    try:
        with ChatPage(app.url) as page, KfreshClient(addr) as kfresh:
            page.wait_knowledge("tent-prices", 1)
            first = page.ask("How much does the Halden 2 tent cost?")
            assert "189" in first.text and ("tent-prices", 1) in first.citations, first
            stove = page.ask("How much does the Emberlite stove cost?")
            assert "45" in stove.text and ("emberlite-stove", 1) in stove.citations, stove

            # a price change: the next answer has the new price, with no reload
            acks = apply(kfresh, find_step("1"))
            page.wait_knowledge("tent-prices", acks[0].version)
            after = page.ask("How much does the Halden 2 tent cost?")
            assert "169" in after.text and ("tent-prices", 2) in after.citations, after

            # a new returns policy supersedes the old one: the answer says so
            apply(kfresh, find_step("2"))
            page.wait_knowledge("returns-policy-2026", 1)
            returns = page.ask("How many days do I have to return an item?")
            assert "60" in returns.text and ("returns-policy-2026", 1) in returns.citations, returns
            assert ("returns-policy-2025", 1) in returns.superseded, returns

            # a withdrawn product is deleted: the chat no longer answers from it
            apply(kfresh, find_step("3"))
            assert page.wait_knowledge("emberlite-stove", 2)["op"] == "delete"
            gone = page.ask("How much does the Emberlite stove cost?")
            assert gone.refused and "could not find" in gone.text and not gone.citations, gone

            page.vote(returns.answer_id, "up")
            page.vote(gone.answer_id, "down")
            # bad input: a clear sentence in the page, nothing sent to kfresh
            assert page.ask("   ").text == "Type a question first."
            pasted = page.ask("x" * 100_000)
            assert pasted.state == "error" and "100,000 characters" in pasted.text and "2,000" in pasted.text
            page.screenshot(tmp_path / "chat.png")
            assert (tmp_path / "chat.png").stat().st_size > 10_000
    finally:
        log = app.stop()
    assert "Traceback" not in log, log
    votes = subprocess.run([sys.executable, str(CHATBOT / "run.py"), "--feedback", "--data", str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = [json.loads(line) for line in votes.splitlines()]
    assert [r["vote"] for r in rows if r["vote"]] == ["up", "down"]
    assert any(r["vote"] == "up" and "returns-policy-2026 v1" in r["cited"] for r in rows)


def test_the_page_says_so_when_kfresh_is_down(tmp_path: Path) -> None:
    from kfresh.core.net import free_port

    app = WebApp("--kfresh-addr", f"127.0.0.1:{free_port()}", "--no-documents", data=tmp_path)
    try:
        with ChatPage(app.url) as page:
            shown = page.ask("When are you open on Sunday?", timeout=60)
            assert shown.state == "error" and "is not reachable right now" in shown.text, shown
            assert "not reachable" in page.status() or "connecting" in page.status()
    finally:
        log = app.stop()
    assert "Traceback" not in log, log


def test_the_chat_works_over_tls_with_a_token(
    engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    pki = _pki(tmp_path_factory.mktemp("chat-pki"))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{WRITER} write\n")
    (tmp_path / "token").write_text(WRITER + "\n")
    cfg = server_config(
        tmp_path_factory.mktemp("chat-tls"), server__tls_cert_file=pki["server_cert"],
        server__tls_key_file=pki["server_key"], server__auth_tokens_file=tokens, answer__min_score=MIN_SCORE,
        answer__max_tokens=60,
    )  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    addr = f"127.0.0.1:{handle.port}"
    try:
        app = WebApp("--kfresh-addr", addr, "--token-file", str(tmp_path / "token"), "--tls-ca", str(pki["ca_cert"]),
                     data=tmp_path)  # fmt: skip
        try:
            with ChatPage(app.url) as page:
                page.wait_knowledge("opening-hours", 1)
                shown = page.ask("When is the store open on Sunday?")
                assert "11" in shown.text and ("opening-hours", 1) in shown.citations, shown
        finally:
            log = app.stop()
        assert "Traceback" not in log, log
        with KfreshClient(addr, credentials=tls_credentials(ca_file=pki["ca_cert"]), token=WRITER) as kfresh:
            assert kfresh.stats(timeout=10).documents == 7  # the web app loaded them over TLS with the token
        # the same app with no token: the page explains the refusal instead of failing silently
        bare = WebApp("--kfresh-addr", addr, "--tls-ca", str(pki["ca_cert"]), "--no-documents", data=tmp_path)
        try:
            with ChatPage(bare.url) as page:
                refused = page.ask("When is the store open on Sunday?", timeout=60)
                assert refused.state == "error" and "refused this chat's credentials (UNAUTHENTICATED)" in refused.text
        finally:
            bare.stop()
    finally:
        handle.stop()
