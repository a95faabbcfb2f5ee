"""Streaming ingestion from a durable log: a NATS JetStream pull consumer feeding a kfresh server.

At-least-once, made idempotent, and never out of order:
- a message is acknowledged to NATS (`ack_sync`, confirmed) only after kfresh acknowledged the document
  as durably stored, so a crash anywhere redelivers it; a redelivered, already-stored document comes back
  UNCHANGED (kfresh compares content), so nothing is stored twice;
- messages are applied strictly in stream order, one at a time: the next goes to kfresh only after NATS
  confirmed the previous one's ack, so the only message that can be redelivered after being applied is
  the last one, and an older version can never overwrite a newer one (no extra versions either). Loopback
  round trips are small next to kfresh's per-document fsync, so this costs little. Run one consumer
  process per durable (shard subjects over several durables for more);
- a message kfresh can never accept (bad JSON, missing fields, INVALID_ARGUMENT) goes to the dead-letter
  subject with the reason and is terminated; while kfresh is UNAVAILABLE or RESOURCE_EXHAUSTED messages
  are nak'ed with a delay and retried, never dropped.

Message payload: one JSON object as in `kfresh ingest` JSONL: {"id", "text", "source"?, "metadata"?,
"valid_from"?, "supersedes"?} or {"delete": id}.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from kfresh.client.sources import SourceError, jsonl_record
from kfresh.core.config import NatsConfig
from kfresh.v1 import kfresh_pb2 as pb

if TYPE_CHECKING:
    from nats.aio.msg import Msg

log = logging.getLogger("kfresh.nats")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}  # fmt: skip
_POSITION = re.compile(r"ingest message #(\d+)")


@dataclass
class ConsumeStats:
    """What a consumer did: kfresh ack statuses, dead letters, retries (naks)."""

    acked: Counter[str] = field(default_factory=Counter)
    dead: int = 0
    retried: int = 0

    @property
    def messages(self) -> int:
        return sum(self.acked.values()) + self.dead


def parse_message(data: bytes, where: str) -> pb.IngestRequest:
    """One message -> an IngestRequest; SourceError names what is wrong."""
    try:
        line = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})") from None
    return jsonl_record(line, where)


class NatsIngestor:
    """One durable JetStream pull consumer -> one kfresh server. `async with` or start()/close()."""

    def __init__(self, cfg: NatsConfig, *, addr: str, client_options: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.addr = addr
        self.stats = ConsumeStats()
        self._client_options = client_options or {}
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
        self._client: Any = None

    async def __aenter__(self) -> NatsIngestor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            import nats
            from nats.js import api
        except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
            raise RuntimeError("kfresh consume needs nats-py: pip install nats-py") from exc
        from kfresh.client import AsyncKfreshClient

        cfg = self.cfg
        self._nc = await nats.connect(servers=[u.strip() for u in cfg.url.split(",")], name=f"kfresh-{cfg.durable}")
        self._js = self._nc.jetstream()
        if cfg.create_stream:
            await self._ensure_stream(api)
        consumer = api.ConsumerConfig(
            durable_name=cfg.durable, ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=cfg.ack_wait_s, max_ack_pending=1, filter_subject=cfg.subject,
        )  # fmt: skip
        self._sub = await self._js.pull_subscribe(cfg.subject, durable=cfg.durable, stream=cfg.stream, config=consumer)
        self._client = AsyncKfreshClient(self.addr, **self._client_options)
        log.info("nats.consuming url=%s stream=%s subject=%s durable=%s kfresh=%s", cfg.url, cfg.stream, cfg.subject,
                 cfg.durable, self.addr)  # fmt: skip

    async def _ensure_stream(self, api: Any) -> None:
        from nats.js.errors import NotFoundError

        try:
            await self._js.stream_info(self.cfg.stream)
        except NotFoundError:
            await self._js.add_stream(
                api.StreamConfig(name=self.cfg.stream, subjects=[self.cfg.subject], storage=api.StorageType.FILE)
            )
            log.info("nats.stream_created stream=%s subject=%s", self.cfg.stream, self.cfg.subject)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._nc is not None:
            # No drain: every message this consumer finished is already confirmed (ack_sync); what it did
            # not finish must be redelivered anyway.
            await self._nc.close()
            self._nc = None

    async def run(self, *, stop: asyncio.Event | None = None, idle_exit_s: float | None = None) -> ConsumeStats:
        """Consume until `stop` is set (or, with idle_exit_s, until the stream has been empty that long)."""
        from nats.errors import TimeoutError as FetchTimeout

        idle = 0.0
        while stop is None or not stop.is_set():
            try:
                # One outstanding message (max_ack_pending=1): after a crash nothing newer is delivered
                # before the unacknowledged one comes back, so order holds across restarts too.
                msgs = await self._sub.fetch(1, timeout=self.cfg.fetch_timeout_s)
            except FetchTimeout:
                idle += self.cfg.fetch_timeout_s
                if idle_exit_s is not None and idle >= idle_exit_s:
                    break
                continue
            idle = 0.0
            await self.process(msgs)
        return self.stats

    async def process(self, msgs: list[Msg]) -> None:
        """Apply fetched messages in stream order; ack each once kfresh stored it."""
        good: list[tuple[Msg, pb.IngestRequest]] = []
        for msg in msgs:
            try:
                good.append((msg, parse_message(msg.data, f"{msg.subject}#{msg.metadata.sequence.stream}")))
            except SourceError as exc:
                await self._dead(msg, str(exc))
        while good:
            good = await self._send(good)

    async def _send(self, batch: list[tuple[Msg, pb.IngestRequest]]) -> list[tuple[Msg, pb.IngestRequest]]:
        """Stream the batch to kfresh; returns what still has to be sent (after a rejected message)."""
        done = 0
        turn = asyncio.Event()
        turn.set()

        async def lockstep() -> AsyncIterator[pb.IngestRequest]:
            # The next document goes out only once NATS confirmed the previous one's ack: kfresh never holds
            # more than one applied-but-unacknowledged message, so a redelivery can only repeat that one.
            for _, request in batch:
                await turn.wait()
                turn.clear()
                yield request

        try:
            async for ack in self._client.ingest(lockstep(), timeout=max(30.0, self.cfg.ack_wait_s / 2)):
                await self._confirm(batch[done][0])
                self.stats.acked[pb.AckStatus.Name(ack.status).removeprefix("ACK_STATUS_").lower()] += 1
                done += 1
                turn.set()
            return []
        except grpc.aio.AioRpcError as exc:
            rest = batch[done:]
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and (m := _POSITION.search(exc.details() or "")):
                bad = int(m.group(1)) - 1 - done  # the server numbers the stream's messages from 1
                if 0 <= bad < len(rest):
                    await self._dead(rest[bad][0], exc.details() or "INVALID_ARGUMENT")
                    return rest[:bad] + rest[bad + 1 :]  # any before it that kfresh did not ack: resend
            # Not applied: redeliver later, never drop. An unexpected status is logged as an error.
            for msg, _ in rest:
                await msg.nak(delay=self.cfg.retry_delay_s)
            self.stats.retried += len(rest)
            if exc.code() in RETRYABLE:
                log.warning("nats.kfresh_unavailable code=%s retry_in_s=%.1f pending=%d", exc.code().name,
                            self.cfg.retry_delay_s, len(rest))  # fmt: skip
                await asyncio.sleep(self.cfg.retry_delay_s)
            else:
                log.error("nats.ingest_failed code=%s detail=%s", exc.code().name, exc.details())
            return []

    async def _confirm(self, msg: Msg, attempts: int = 3) -> None:
        """Ack and wait until NATS confirms it (acks are idempotent, so a lost confirmation is retried);
        moving on without a confirmed ack could let this message be redelivered after a newer one."""
        from nats.errors import TimeoutError as AckTimeout

        for attempt in range(1, attempts + 1):
            try:
                await msg.ack_sync(timeout=5.0)
                return
            except AckTimeout:
                if attempt == attempts:
                    raise
                log.warning("nats.ack_unconfirmed seq=%d attempt=%d", msg.metadata.sequence.stream, attempt)

    async def _dead(self, msg: Msg, reason: str) -> None:
        log.warning("nats.dead_letter seq=%d reason=%s", msg.metadata.sequence.stream, reason)
        if self.cfg.dead_letter_subject:
            await self._nc.publish(self.cfg.dead_letter_subject, msg.data, headers={"Kfresh-Error": reason[:512],
                                   "Kfresh-Source-Seq": str(msg.metadata.sequence.stream)})  # fmt: skip
        await msg.term()
        self.stats.dead += 1
