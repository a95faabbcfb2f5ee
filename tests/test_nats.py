"""NATS JetStream -> kfresh against a real `nats-server -js` and a real kfresh server over loopback:
everything arrives once, in order, poison goes to the dead-letter subject, a consumer crash between
kfresh's ack and NATS's ack duplicates and loses nothing, and an unavailable server delays but drops nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_helper import ServerHandle, server_config

from kfresh.client import KfreshClient
from kfresh.client.nats_ingest import NatsIngestor, parse_message
from kfresh.client.sources import SourceError
from kfresh.core.config import NatsConfig
from kfresh.core.net import free_port
from kfresh.testing.nats import nats_bin, nats_server

NATS = nats_bin()
pytestmark = pytest.mark.skipif(
    NATS is None, reason="nats-server is missing (Debian package `nats-server`; .ci/run installs it)"
)


def test_messages_parse_like_ingest_jsonl() -> None:
    assert parse_message(b'{"id": "a", "text": "x", "metadata": {"n": 1}}', "s#1").upsert.metadata["n"] == "1"
    assert parse_message(b'{"delete": "a"}', "s#2").delete_id == "a"
    for bad in (b"{not json", b"[1, 2]", b'{"text": "no id"}', b"\xff\xfe"):
        with pytest.raises(SourceError, match="s#3"):
            parse_message(bad, "s#3")


@pytest.fixture()
def nats_url(tmp_path: Path) -> Iterator[str]:
    with nats_server(tmp_path / "js") as url:
        yield url


def kfresh_server(engine_loop: Any, home: Path, port: int = 0) -> ServerHandle:
    # Ingestion only: the generation backend is deliberately unreachable (Answer would be UNAVAILABLE).
    cfg = server_config(
        home, server__port=port, generation__backend="remote", generation__remote_url="http://127.0.0.1:9"
    )
    return ServerHandle(engine_loop, cfg, None)


def config(url: str, **over: Any) -> NatsConfig:
    return NatsConfig(url=url, ack_wait_s=2.0, fetch_timeout_s=0.3, retry_delay_s=0.5, **over)


async def publish(url: str, rows: list[Any], cfg: NatsConfig) -> None:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.stream_info(cfg.stream)
    except Exception:
        await js.add_stream(api.StreamConfig(name=cfg.stream, subjects=[cfg.subject], storage=api.StorageType.FILE))
    for row in rows:
        await js.publish(cfg.subject, row if isinstance(row, bytes) else json.dumps(row).encode())
    await nc.close()


async def consume(
    cfg: NatsConfig, addr: str, *, idle_exit_s: float = 1.5, stop_after_s: float | None = None,
    ingestor: type[NatsIngestor] = NatsIngestor,
) -> Any:  # fmt: skip
    stop = asyncio.Event()
    if stop_after_s is not None:
        asyncio.get_running_loop().call_later(stop_after_s, stop.set)
    async with ingestor(cfg, addr=addr) as consumer:
        return await consumer.run(stop=stop, idle_exit_s=idle_exit_s)


def state(addr: str, ids: list[str]) -> dict[str, tuple[int, str]]:
    """doc_id -> (version, text) as Retrieve returns it, once everything acknowledged is searchable."""
    out = {}
    with KfreshClient(addr) as client:
        for doc_id in ids:
            chunks = client.retrieve(doc_id, k=50, filter={"key": doc_id}).chunks
            if chunks:
                out[doc_id] = (chunks[0].version, chunks[0].text)
    return out


def wait_indexed(addr: str) -> None:
    with KfreshClient(addr) as client:
        deadline = time.monotonic() + 60
        while client.stats().pending:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def doc(i: int, text: str | None = None) -> dict[str, Any]:
    return {"id": f"n-{i}", "text": text or f"Ledger entry {i}: crate {i} is stored in bay {i % 7}.",
            "source": "nats/test", "metadata": {"key": f"n-{i}"}}  # fmt: skip


def test_stream_is_applied_in_order_and_poison_goes_to_dead_letters(
    engine_loop: Any, nats_url: str, tmp_path: Path
) -> None:
    server = kfresh_server(engine_loop, tmp_path / "home")
    addr, cfg = f"127.0.0.1:{server.port}", config(nats_url)
    try:
        dead: list[Any] = []

        async def scenario() -> Any:
            import nats

            nc = await nats.connect(nats_url)

            async def collect(msg: Any) -> None:
                dead.append(msg)

            await nc.subscribe(cfg.dead_letter_subject, cb=collect)
            rows: list[Any] = [doc(i) for i in range(20)]
            rows += [b"{broken", doc(3, "Ledger entry 3 was corrected: crate 3 is in bay 12."), {"delete": "n-4"}]
            rows += [{"id": "n-empty", "text": ""}, doc(21)]  # empty text: kfresh answers INVALID_ARGUMENT
            await publish(nats_url, rows, cfg)
            stats = await consume(cfg, addr)
            await nc.flush()
            await asyncio.sleep(0.2)
            await nc.close()
            return stats

        stats = engine_loop.run(scenario(), timeout=120)
        assert stats.acked == {"stored": 22, "deleted": 1} and stats.dead == 2 and stats.retried == 0, stats
        assert len(dead) == 2 and {m.headers["Kfresh-Source-Seq"] for m in dead} == {"21", "24"}
        assert "not valid JSON" in dead[0].headers["Kfresh-Error"]
        wait_indexed(addr)
        published = [f"n-{i}" for i in (*range(20), 21)]
        docs = state(addr, published)
        assert set(docs) == set(published) - {"n-4"}
        assert docs["n-3"] == (2, "Ledger entry 3 was corrected: crate 3 is in bay 12.")
        assert all(v == 1 for d, (v, _) in docs.items() if d != "n-3")
        # A second consumer on the same durable has nothing left to do.
        again = engine_loop.run(consume(cfg, addr, idle_exit_s=0.6), timeout=60)
        assert again.messages == 0
    finally:
        server.stop()


class CrashAfterKfreshAck(NatsIngestor):
    """Fault injection: dies after kfresh stored message N but before NATS heard of it."""

    crash_at = 5

    async def _send(self, batch: list[Any]) -> list[Any]:
        for msg, _ in batch:
            if msg.metadata.sequence.stream == self.crash_at:

                async def die(*_: Any, **__: Any) -> None:
                    raise ConnectionError("consumer crashed before acking NATS")

                msg.ack_sync = die  # type: ignore[method-assign]
        return await super()._send(batch)


def test_a_crash_between_the_two_acks_duplicates_and_loses_nothing(
    engine_loop: Any, nats_url: str, tmp_path: Path
) -> None:
    server = kfresh_server(engine_loop, tmp_path / "home")
    addr, cfg = f"127.0.0.1:{server.port}", config(nats_url)
    try:
        rows = (
            [doc(i) for i in range(6)]
            + [doc(2, "Ledger entry 2 moved: crate 2 is in bay 40.")]
            + [doc(i) for i in range(6, 10)]
        )
        engine_loop.run(publish(nats_url, rows, cfg), timeout=30)
        with pytest.raises(ConnectionError):
            engine_loop.run(consume(cfg, addr, ingestor=CrashAfterKfreshAck), timeout=60)
        stats = engine_loop.run(consume(cfg, addr, idle_exit_s=4.0), timeout=90)  # > ack_wait: redelivery
        # Message 5 (n-4) was stored before the crash: redelivered, it comes back UNCHANGED, not a version 2;
        # nothing after it had been sent (one message in flight at a time).
        assert stats.acked["unchanged"] == 1 and stats.acked["stored"] == 6 and stats.dead == 0, stats
        wait_indexed(addr)
        docs = state(addr, [f"n-{i}" for i in range(10)])
        assert len(docs) == 10 and docs["n-4"][0] == 1
        assert docs["n-2"] == (2, "Ledger entry 2 moved: crate 2 is in bay 40.")  # the newer version, never the older
    finally:
        server.stop()


def test_an_unavailable_server_delays_messages_but_drops_none(engine_loop: Any, nats_url: str, tmp_path: Path) -> None:
    port = free_port()
    cfg = config(nats_url)
    engine_loop.run(publish(nats_url, [doc(i) for i in range(5)], cfg), timeout=30)
    # Nothing listens: every attempt is UNAVAILABLE and nak'ed for redelivery, so the stream never looks idle.
    down = engine_loop.run(consume(cfg, f"127.0.0.1:{port}", stop_after_s=2.5), timeout=60)
    assert sum(down.acked.values()) == 0 and down.retried >= 5 and down.dead == 0
    server = kfresh_server(engine_loop, tmp_path / "home", port=port)
    try:
        up = engine_loop.run(consume(cfg, f"127.0.0.1:{port}", idle_exit_s=3.0), timeout=90)
        assert up.acked == {"stored": 5} and up.dead == 0, up
        wait_indexed(f"127.0.0.1:{port}")
        assert len(state(f"127.0.0.1:{port}", [f"n-{i}" for i in range(5)])) == 5
    finally:
        server.stop()
