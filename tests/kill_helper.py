"""SIGKILL rounds for the reliability suite: a `kfresh serve` subprocess under concurrent streaming ingest
(new documents, upserts, deletes) is killed at a random point, restarted (sometimes killed again during
recovery, sometimes with its index snapshot damaged) and checked against the client's exact model of what
was acknowledged (reliability_helper.DocModel): nothing acknowledged lost, no stale or half-applied state.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from reliability_helper import DocModel, KillReport, doc_text, kill, start_server, wait_serving

from kfresh.client import KfreshClient, document
from kfresh.core.net import free_port
from kfresh.v1 import kfresh_pb2 as pb

WINDOW = 16  # unacknowledged ingest messages a kill-round stream keeps in flight


# The revision number that reliability_helper.doc_text wrote into a document's text.
def _rev_of(text: str) -> int:
    return int(text.split(" revision ", 1)[1].split(":", 1)[0])


class KillHarness:
    """Rounds of: start, concurrent streaming ingest (new docs, upserts, deletes), SIGKILL, restart, verify."""

    def __init__(self, home: Path, *, seed: int, streams: int = 2, server_args: tuple[str, ...] = ()) -> None:
        self.home = home
        self.rng = random.Random(seed)
        self.streams = streams
        self.server_args = (
            "--index.snapshot_every_changes",
            "40",
            "--index.snapshot_every_fraction",
            "0",
            *server_args,
        )
        self.docs: dict[str, DocModel] = {}
        self.lock = threading.Lock()
        self.report = KillReport()
        self.touched: set[str] = set()  # documents the previous round sent something for
        self._sending: set[str] = set()
        self._next = 0

    # one stream's traffic: each stream owns its documents, so commit order = ack order per document
    def _traffic(
        self, stream: int, count: int, sent: list[tuple[str, str, int]], window: threading.Semaphore
    ) -> Iterator[pb.IngestRequest]:
        rng = random.Random(self.rng.random())
        for _ in range(count):
            if not window.acquire(timeout=5):  # a pipelined client: at most WINDOW unacknowledged sends
                return  # the server is gone
            with self.lock:
                mine = [d for d, m in self.docs.items() if hash_stream(d, self.streams) == stream
                        and m.acked_version and not m.delete_sent]  # fmt: skip
                roll = rng.random()
                if mine and roll < 0.05:
                    doc_id = rng.choice(mine)
                    self.docs[doc_id].delete_sent = True
                    sent.append(("delete", doc_id, -1))
                    self._sending.add(doc_id)
                    req = pb.IngestRequest(delete_id=doc_id)
                else:
                    if mine and roll < 0.30:
                        doc_id = rng.choice(mine)
                    else:
                        doc_id = self._new_id(stream)
                    model = self.docs.setdefault(doc_id, DocModel())
                    model.sent_rev += 1
                    rev = model.sent_rev
                    sent.append(("upsert", doc_id, rev))
                    self._sending.add(doc_id)
                    req = pb.IngestRequest(upsert=document(doc_id, doc_text(doc_id, rev), metadata={"doc": doc_id}))
            yield req

    def _new_id(self, stream: int) -> str:
        while True:
            self._next += 1
            doc_id = f"d{self._next:06d}"
            if hash_stream(doc_id, self.streams) == stream:
                return doc_id

    def _ingest(self, addr: str, stream: int, acks: list[int]) -> None:
        sent: list[tuple[str, str, int]] = []
        window = threading.Semaphore(WINDOW)
        try:
            with KfreshClient(addr) as client:
                for i, ack in enumerate(client.ingest(self._traffic(stream, 4000, sent, window), timeout=120)):
                    window.release()
                    op, doc_id, rev = sent[i]
                    with self.lock:
                        m = self.docs[doc_id]
                        if op == "delete":
                            m.delete_acked = True
                            self.report.deletes_acked += 1
                        else:
                            m.acked_version, m.acked_rev = ack.version, rev
                            self.report.upserts_acked += 1
                        acks[0] += 1
        except grpc.RpcError:
            pass  # the server was killed under the stream

    def round(
        self,
        *,
        damage_snapshot: bool = False,
        kill_in_recovery: bool = False,
        check_sample: int = 30,
        max_delay_s: float = 2.5,
    ) -> None:
        started = time.monotonic()
        port = free_port()
        addr = f"127.0.0.1:{port}"
        proc = start_server(self.home, port, *self.server_args)
        try:
            self.report.restart_s.append(wait_serving(addr, proc))
            self._verify(addr, proc, sample=check_sample)
            self._sending = set()
            acks = [0]
            threads = [threading.Thread(target=self._ingest, args=(addr, s, acks)) for s in range(self.streams)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while acks[0] < 20 and time.monotonic() < deadline:  # let the streams get going, then a random point
                time.sleep(0.01)
            delay = self.rng.uniform(0.0, max_delay_s)
            time.sleep(delay)
            kill(proc)
            for t in threads:
                t.join(timeout=60)
            self.report.acks_at_kill.append(acks[0])
            self.report.kill_after_s.append(delay)
            self.report.rounds += 1
        finally:
            kill(proc)
        if damage_snapshot:
            self.report.damaged_snapshots += damage(self.home / "index" / "index.snap", self.rng)
        if kill_in_recovery:  # die again while the backlog from the last round is being embedded
            port = free_port()
            proc = start_server(self.home, port, *self.server_args)
            try:
                wait_serving(f"127.0.0.1:{port}", proc)
                time.sleep(self.rng.uniform(0.0, 0.5))
            finally:
                kill(proc)
            self.report.recovery_kills += 1
        self.touched = self._sending
        self.report.seconds += time.monotonic() - started

    def final_check(self, *, sample: int | None = None) -> None:
        """Restart once more; search the last round's documents and `sample` others (None = all of them)."""
        port = free_port()
        addr = f"127.0.0.1:{port}"
        proc = start_server(self.home, port, *self.server_args)
        try:
            self.report.restart_s.append(wait_serving(addr, proc))
            self._verify(addr, proc, sample=sample)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            kill(proc)
        self._check_rows()

    def _verify(self, addr: str, proc: subprocess.Popen[bytes], *, sample: int | None) -> None:
        """Every acknowledged document is searchable at (at least) its acknowledged version, with that text."""
        with self.lock:
            docs = {d: DocModel(**vars(m)) for d, m in self.docs.items()}
        ids = sorted(d for d, m in docs.items() if m.acked_version or m.delete_sent)  # the rest: _check_rows
        if sample is not None:
            recent = self.touched
            older = [d for d in ids if d not in recent]
            ids = sorted((recent & set(ids)) | set(self.rng.sample(older, min(sample, len(older)))))
        with KfreshClient(addr) as client, ThreadPoolExecutor(3) as pool:
            _wait_indexed(client)
            list(pool.map(lambda d: self._check_one(client, d, docs[d]), ids))
        self._check_rows()

    def _check_one(self, client: KfreshClient, doc_id: str, m: DocModel) -> None:
        query = doc_text(doc_id, max(m.acked_rev, 0))
        for attempt in range(3):
            chunks = client.retrieve(query, k=1, filter={"doc": doc_id}, timeout=30).chunks
            with self.lock:
                self.report.checked_searches += 1
            hit = chunks[0] if chunks else None
            if m.delete_acked:
                if hit is not None:
                    self.report.lost.append(f"{doc_id}: deleted (acknowledged) but still found")
                return
            if hit is None:
                if m.delete_sent or not m.acked_version:
                    return  # an unacknowledged delete may have committed; an unacked first send may not have
                if attempt < 2:
                    time.sleep(0.5)
                    continue
                self.report.lost.append(f"{doc_id}: acknowledged v{m.acked_version} not searchable")
                return
            rev = _rev_of(hit.text)
            if hit.doc_id != doc_id or hit.text != doc_text(doc_id, rev):
                self.report.half_applied.append(f"{doc_id}: hit {hit.doc_id} text {hit.text[:60]!r}")
            elif hit.version < m.acked_version or rev < m.acked_rev or rev > m.sent_rev:
                self.report.stale.append(
                    f"{doc_id}: served v{hit.version}/r{rev}, acked v{m.acked_version}/r{m.acked_rev}"
                )
            elif hit.version == m.acked_version and rev != m.acked_rev:
                self.report.half_applied.append(f"{doc_id}: v{hit.version} holds r{rev}, acked r{m.acked_rev}")
            elif self.rng.random() < 0.25:  # the history (issue 19): "as of now" serves that same version
                past = client.retrieve(query, k=1, filter={"doc": doc_id}, as_of=time.time(), timeout=30).chunks
                if not past or (past[0].version, past[0].text) != (hit.version, hit.text):
                    self.report.lost.append(f"{doc_id}: as_of now serves {[(c.version, c.text) for c in past]}")
            return

    def _check_rows(self) -> None:
        """Structural invariants of the store (read-only): no chunk without its document and version rows,
        no live document without chunks for its current version, no document the client never sent."""
        conn = sqlite3.connect(f"file:{self.home / 'kfresh.db'}?mode=ro", uri=True, timeout=30)
        try:
            orphans = conn.execute(
                "SELECT c.doc_id, c.version FROM chunks c LEFT JOIN documents d ON d.doc_id=c.doc_id"
                " LEFT JOIN versions v ON v.doc_id=c.doc_id AND v.version=c.version"
                " WHERE d.doc_id IS NULL OR v.doc_id IS NULL OR c.version>d.version"
            ).fetchall()
            empty = conn.execute(
                "SELECT d.doc_id FROM documents d WHERE d.deleted=0 AND NOT EXISTS"
                " (SELECT 1 FROM chunks c WHERE c.doc_id=d.doc_id AND c.version=d.version)"
            ).fetchall()
            rows = conn.execute("SELECT doc_id, version, deleted, text FROM documents").fetchall()
            history = _history_faults(conn)
        finally:
            conn.close()
        self.report.half_applied += [f"orphan chunk {d} v{v}" for d, v in orphans]
        self.report.half_applied += [f"live {d} without chunks" for (d,) in empty]
        self.report.half_applied += history
        with self.lock:
            for doc_id, version, deleted, text in rows:
                m = self.docs.get(doc_id)
                if m is None:
                    self.report.half_applied.append(f"{doc_id}: in the store but never sent")
                elif deleted and not m.delete_sent:
                    self.report.lost.append(f"{doc_id}: deleted but no delete was sent")
                elif not deleted and m.delete_acked:
                    self.report.lost.append(f"{doc_id}: delete acknowledged but the document is live")
                elif version < m.acked_version or (not deleted and _rev_of(text) < m.acked_rev):
                    self.report.stale.append(f"{doc_id}: store v{version}, acked v{m.acked_version}")
            present = {r[0] for r in rows}
            self.report.lost += [f"{d}: acknowledged but absent from the store" for d, m in self.docs.items()
                                 if m.acked_version and d not in present]  # fmt: skip


def _history_faults(conn: sqlite3.Connection) -> list[str]:
    """The history written in the versions' own transactions (issue 19): every live document's current version
    is its one open history row, a deleted document has none open, and every version kept has its chunk rows
    (current, or moved to history_chunks)."""
    unopened = conn.execute(
        "SELECT d.doc_id, d.version FROM documents d WHERE d.deleted=0 AND NOT EXISTS (SELECT 1 FROM history h"
        " WHERE h.doc_id=d.doc_id AND h.version=d.version AND h.ended_at IS NULL)"
    ).fetchall()
    open_rows = conn.execute(
        "SELECT h.doc_id, h.version FROM history h JOIN documents d ON d.doc_id=h.doc_id WHERE h.ended_at IS NULL"
        " AND (d.deleted=1 OR h.version<>d.version)"
    ).fetchall()
    chunkless = conn.execute(
        "SELECT h.doc_id, h.version FROM history h WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.doc_id=h.doc_id"
        " AND c.version=h.version) AND NOT EXISTS (SELECT 1 FROM history_chunks c WHERE c.doc_id=h.doc_id"
        " AND c.version=h.version)"
    ).fetchall()
    return (
        [f"history: live {d} v{v} has no open history row" for d, v in unopened]
        + [f"history: {d} v{v} still open although replaced or deleted" for d, v in open_rows]
        + [f"history: {d} v{v} kept without its chunks" for d, v in chunkless]
    )


def hash_stream(doc_id: str, streams: int) -> int:
    return int(doc_id[1:]) % streams


def _wait_indexed(client: KfreshClient, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while client.stats(timeout=10).pending and time.monotonic() < deadline:
        time.sleep(0.1)


def damage(path: Path, rng: random.Random) -> int:
    """Truncate or flip bytes in a snapshot file; 1 if there was one to damage."""
    if not path.is_file() or path.stat().st_size < 64:
        return 0
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5:
        data = data[: rng.randrange(16, len(data) - 1)]
    else:
        for _ in range(8):
            data[rng.randrange(len(data))] ^= 0xFF
    path.write_bytes(bytes(data))
    return 1
