"""chaos: two replicas over PostgreSQL under random faults, every operation recorded, a checker over the history.

Two `kfresh serve` replicas (no generation) share a throwaway PostgreSQL cluster and follow its change log.
Two writers, one per replica, upsert, supersede and delete documents of their own (each document's changes
numbered in order: its revisions); after each acknowledged write, the other replica is read with the ack's seq
(`min_seq`, read your writes). A reader per replica reads random documents all the time, and a prober
measures ack on one replica -> visible on the other. A third writer publishes its documents to NATS JetStream,
and a `kfresh consume` process feeds them into replica A (acknowledged = stored in the stream). PostgreSQL and
the replicas' homes live on a small disk (a tmpfs; root only). A nemesis runs `rounds` faults, at random but
every kind once per turn: SIGKILL a replica (then start it again), SIGSTOP it for `fault_s` (then SIGCONT),
restart PostgreSQL fast or immediate, SIGKILL the consumer (then start it again), fill the disk to the last byte
for `disk_full_s` (then free it, and start PostgreSQL again if it stopped, as an operator would).
Every operation is recorded with its invocation and completion time, and a checker then verifies:
- lost: after recovery, each replica serves every document at its last acknowledged revision (or at a later
  one whose write had an unknown outcome), and never a document whose delete was acknowledged;
- monotonic: a replica never serves a revision older than one it served before;
- read your writes: a read with an ack's seq never misses that write (UNAVAILABLE, "not yet applied", is allowed);
- lag: ack -> visible on the other replica outside fault windows (a fault's window runs from its start until
  `settle_s` after it healed), p99 <= 1 s;
- crashes: no replica exits on its own (a full disk, a lost database) and has to be started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment, percentiles
from kfresh.benchmarks.report import Result, Table
from kfresh.v1 import kfresh_pb2 as pb

FAULTS = ("kill", "pause", "pg-fast", "pg-immediate", "consumer-kill", "disk-full")
LAG_TARGET_P99_MS = 1000.0
CALL_S = 5.0  # every client call's deadline
REV = re.compile(r"revision (\d+)\.")


class ChaosOptions(SuiteOptions):
    rounds: int = Field(100, ge=1, description="Faults the nemesis injects, one after the other.")
    docs_per_writer: int = Field(40, ge=2, description="Documents each of the two writers changes.")
    fault_s: float = Field(2.0, gt=0, description="How long a paused replica stays stopped, or a killed one down.")
    calm_s: float = Field(5.0, ge=0, description="Time without a fault between two faults.")
    settle_s: float = Field(2.0, ge=0, description="A fault's window lasts this long after it healed.")
    backoff_s: float = Field(0.2, ge=0, description="A client's pause after a failed call, before its next one.")
    min_seq_wait_s: float = Field(3.0, gt=0, description="retrieval.min_seq_wait_s of the replicas.")
    disk_full_s: float = Field(5.0, gt=0, description="How long the disk stays full (long enough for tables to grow).")
    nats: bool = Field(
        True, description="A third writer through NATS JetStream and `kfresh consume` (needs nats-server)."
    )
    nats_pause_s: float = Field(0.05, ge=0, description="The NATS writer's pause between two publishes.")
    disk_mb: int = Field(
        1024,
        ge=0,
        description="Size of the small disk PostgreSQL and the replicas live on (a tmpfs, needs root), "
        "which the nemesis fills; 0 = the temp folder and no disk-full faults.",
    )
    seed: int = Field(2026, description="Seed of the nemesis and the workload.")

    @classmethod
    def quick(cls) -> ChaosOptions:
        return cls(
            rounds=len(FAULTS), docs_per_writer=6, fault_s=1.0, calm_s=2.0, settle_s=1.0, disk_mb=256, disk_full_s=3.0
        )


@dataclass
class History:
    """Every operation, in completion order, and the fault windows (seconds since the start)."""

    start: float = field(default_factory=time.monotonic)
    ops: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    down: set[str] = field(default_factory=set)  # replicas the nemesis has killed or paused right now
    crashes: list[dict[str, Any]] = field(default_factory=list)  # replicas that exited on their own
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return round(time.monotonic() - self.start, 4)

    def add(self, **op: Any) -> None:
        with self.lock:
            self.ops.append(op)

    def in_fault(self, t0: float, t1: float, settle_s: float) -> bool:
        return any(f["start"] <= t1 and t0 <= f.get("healed", 1e18) + settle_s for f in self.faults)


def _text(doc: str, rev: int) -> str:
    return f"Chaos document {doc} revision {rev}. The ledger of harbour {doc} lists crate {rev * 7 % 97}."


def _status(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return code().name if callable(code) else type(exc).__name__


def read_doc(c: Any, doc: str, **kw: Any) -> int | None:
    """The revision `doc` is served at on that replica, or None when it serves none (deleted or never written)."""
    chunks = c.retrieve("Chaos document", k=1, filter={"doc": doc}, timeout=CALL_S, **kw).chunks
    if not chunks:
        return None
    found = REV.search(chunks[0].text)
    return int(found.group(1)) if found else -1


class Writer(threading.Thread):
    """Changes its own documents through one replica; after each acknowledged write, reads it on the other."""

    def __init__(self, name: str, mine: Any, other: Any, other_name: str, history: History, opts: ChaosOptions,
                 stop: threading.Event) -> None:  # fmt: skip
        super().__init__(daemon=True, name=f"writer-{name}")
        self.prefix, self.mine, self.other, self.other_name = name, mine, other, other_name
        self.history, self.opts, self.stop = history, opts, stop
        self.rng = random.Random(f"{opts.seed}-{name}")
        self.revs: Counter[str] = Counter()

    def run(self) -> None:
        from kfresh.client import document

        docs = [f"{self.prefix}-{i}" for i in range(self.opts.docs_per_writer)]
        while not self.stop.is_set():
            kind = self.rng.choices(("upsert", "supersedes", "delete", "new"), weights=(7, 1, 2, 1))[0]
            if kind == "new":  # a document never written before: the store's tables grow (a full disk bites)
                docs.append(f"{self.prefix}-{len(docs)}")
                doc, kind = docs[-1], "upsert"
            else:
                doc = self.rng.choice(docs)
            self.revs[doc] += 1
            rev = self.revs[doc]
            t0 = self.history.now()
            try:
                if kind == "delete":
                    seq = self.mine.delete(doc, timeout=CALL_S).seq
                else:
                    older = [self.rng.choice(docs)] if kind == "supersedes" else []
                    msg = document(
                        doc, _text(doc, rev), metadata={"doc": doc}, supersedes=[d for d in older if d != doc]
                    )
                    (ack,) = list(self.mine.ingest([msg], timeout=CALL_S))
                    if ack.status != pb.ACK_STATUS_STORED:
                        raise RuntimeError(f"ack status {ack.status}")
                    seq = ack.seq
                outcome = "ok"
            except Exception as exc:  # every failure is part of the history
                seq, outcome = 0, _status(exc)
            if outcome == "NOT_FOUND" and kind == "delete":
                outcome = "ok"  # deleting what is not live: a definite no-op, the document stays absent
            self.history.add(op="write", kind=kind, doc=doc, rev=rev, via=self.prefix[0], t0=t0,
                             t1=self.history.now(), outcome=outcome, seq=seq)  # fmt: skip
            if outcome == "ok" and seq and self.other_name not in self.history.down:
                self._read_your_write(doc, rev, kind, seq)
            elif outcome != "ok":
                time.sleep(self.opts.backoff_s)

    def _read_your_write(self, doc: str, rev: int, kind: str, seq: int) -> None:
        t0 = self.history.now()
        try:
            seen, outcome = read_doc(self.other, doc, min_seq=seq), "ok"
        except Exception as exc:
            seen, outcome = None, _status(exc)
        expected = None if kind == "delete" else rev
        violated = outcome == "ok" and seen != expected
        self.history.add(op="ryw", doc=doc, rev=rev, kind=kind, on=self.other_name, t0=t0, t1=self.history.now(),
                         outcome=outcome, seen=seen, violated=violated)  # fmt: skip


class NatsWriter(threading.Thread):
    """Changes its own documents by publishing to the JetStream subject that `kfresh consume` feeds into replica A.
    Acknowledged = JetStream's publish ack (stored in the stream): kfresh must apply it in the end, in order."""

    def __init__(self, url: str, subject: str, history: History, opts: ChaosOptions, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="writer-nats")
        self.url, self.subject, self.history, self.opts, self.stop = url, subject, history, opts, stop
        self.rng = random.Random(f"{opts.seed}-nats")
        self.revs: Counter[str] = Counter()
        self.docs = nats_docs(opts)

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import nats

        nc = await nats.connect(self.url, max_reconnect_attempts=-1)
        js = nc.jetstream()
        try:
            while not self.stop.is_set():
                doc = self.rng.choice(self.docs)
                self.revs[doc] += 1
                rev = self.revs[doc]
                kind = self.rng.choices(("upsert", "delete"), weights=(8, 2))[0]
                row = (
                    {"delete": doc}
                    if kind == "delete"
                    else {"id": doc, "text": _text(doc, rev), "metadata": {"doc": doc}}
                )
                t0 = self.history.now()
                try:
                    await js.publish(self.subject, json.dumps(row).encode(), timeout=CALL_S)
                    outcome = "ok"
                except Exception as exc:  # not stored, or not known to be: either is allowed later
                    outcome = type(exc).__name__
                self.history.add(op="write", kind=kind, doc=doc, rev=rev, via="n", t0=t0, t1=self.history.now(),
                                 outcome=outcome, seq=0)  # fmt: skip
                await asyncio.sleep(self.opts.nats_pause_s if outcome == "ok" else self.opts.backoff_s)
        finally:
            await nc.close()


def nats_docs(opts: ChaosOptions) -> list[str]:
    return [f"n-{i}" for i in range(opts.docs_per_writer)]


class Reader(threading.Thread):
    """Reads random documents on one replica, one after the other: the monotonic-read check's history."""

    def __init__(self, name: str, c: Any, docs: list[str], history: History, opts: ChaosOptions,
                 stop: threading.Event) -> None:  # fmt: skip
        super().__init__(daemon=True, name=f"reader-{name}")
        self.replica, self.c, self.docs, self.history, self.stop = name, c, docs, history, stop
        self.rng = random.Random(f"{opts.seed}-reader-{name}")
        self.backoff_s = opts.backoff_s

    def run(self) -> None:
        while not self.stop.is_set():
            if self.replica in self.history.down:
                time.sleep(0.05)
                continue
            doc = self.rng.choice(self.docs)
            t0 = self.history.now()
            try:
                seen, outcome = read_doc(self.c, doc), "ok"
            except Exception as exc:
                seen, outcome = None, _status(exc)
            self.history.add(op="read", doc=doc, on=self.replica, t0=t0, t1=self.history.now(), outcome=outcome,
                             seen=seen)  # fmt: skip
            time.sleep(0.02 if outcome == "ok" else self.backoff_s)


class Prober(threading.Thread):
    """Ingests a probe document on one replica and polls the other until it serves it: cross-replica lag."""

    def __init__(self, clients: dict[str, Any], history: History, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="prober")
        self.clients, self.history, self.stop = clients, history, stop

    def run(self) -> None:
        from kfresh.client import document

        n = 0
        while not self.stop.is_set():
            n += 1
            src, dst = ("A", "B") if n % 2 else ("B", "A")
            if {src, dst} & self.history.down:
                time.sleep(0.1)
                continue
            doc = f"probe-{n}"
            try:
                (ack,) = list(self.clients[src].ingest([document(doc, _text(doc, 1), metadata={"doc": doc})],
                                                       timeout=CALL_S))  # fmt: skip
                if ack.status != pb.ACK_STATUS_STORED:
                    continue
            except Exception:  # a probe that was not acknowledged measures nothing
                continue
            t0 = self.history.now()
            seen = False
            while not seen and self.history.now() - t0 < 10 and not self.stop.is_set():
                with contextlib.suppress(Exception):
                    seen = read_doc(self.clients[dst], doc) == 1
            if not seen and self.stop.is_set():
                break  # cut short by the end of the run: it measured nothing
            self.history.add(op="probe", doc=doc, src=src, dst=dst, t0=t0, t1=self.history.now(), seen=seen)
            time.sleep(0.3)


def fault_order(rng: random.Random, kinds: list[str]) -> Iterator[str]:
    """The faults at random, every kind once per turn (so a short run still sees each)."""
    while True:
        turn = list(kinds)
        rng.shuffle(turn)
        yield from turn


def nemesis(opts: ChaosOptions, replicas: dict[str, Any], cluster: Any, history: History, *,
            consumer: Any = None, disk: Any = None) -> None:  # fmt: skip
    rng = random.Random(f"{opts.seed}-nemesis")
    kinds = [k for k in FAULTS if (k != "consumer-kill" or consumer) and (k != "disk-full" or disk)]
    order = fault_order(rng, kinds)
    for n in range(opts.rounds):
        time.sleep(opts.calm_s)
        kind, name = next(order), rng.choice(sorted(replicas))
        fault: dict[str, Any] = {"round": n + 1, "kind": kind, "start": history.now()}
        history.faults.append(fault)
        if kind in ("kill", "pause"):
            fault["replica"] = name
            history.down.add(name)
            if kind == "kill":
                replicas[name].kill()
                time.sleep(opts.fault_s)
                fault["restart_s"] = round(replicas[name].start(), 2)
            else:
                replicas[name].pause()
                time.sleep(opts.fault_s)
                replicas[name].resume()
            history.down.discard(name)
        elif kind == "consumer-kill":
            consumer.kill()
            time.sleep(opts.fault_s)
            consumer.start()
        elif kind == "disk-full":
            fault["ballast_mb"] = round(disk.fill() / 2**20, 1)
            time.sleep(opts.disk_full_s)
            disk.free()
            if (started := cluster.ensure_running()) is not None:
                fault["pg_started_s"] = round(started, 2)  # it had stopped: a PANIC on the full disk
        else:
            fault["restart_s"] = round(cluster.restart("fast" if kind == "pg-fast" else "immediate"), 2)
        restart_crashed(replicas, fault, history)
        fault["healed"] = history.now()


def restart_crashed(replicas: dict[str, Any], fault: dict[str, Any], history: History) -> None:
    """A replica that exited on its own during the fault is a finding (recorded), then started again."""
    for name, replica in replicas.items():
        if replica.proc is not None and replica.proc.poll() is not None:
            history.crashes.append({"replica": name, "round": fault["round"], "fault": fault["kind"],
                                    "exit": replica.proc.returncode, "t": history.now()})  # fmt: skip
            history.down.add(name)
            replica.start()
            history.down.discard(name)


def run(opts: ChaosOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.client import document
    from kfresh.core.config import NatsConfig
    from kfresh.testing.disk import DiskUnavailable, small_disk
    from kfresh.testing.nats import Consumer, nats_bin, nats_server
    from kfresh.testing.pgcluster import postgres_cluster
    from kfresh.testing.servers import NO_GENERATION, Replica, client

    if addr:
        raise SystemExit("kfresh bench chaos starts its own replicas and PostgreSQL; it takes no --addr")
    env = environment(server="2 x kfresh serve over one PostgreSQL, no generation")
    history = History()
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kfresh-chaos-")))
        base.chmod(0o755)  # PostgreSQL runs as its own user (as root: `postgres`) and must reach its folder
        disk = None
        if opts.disk_mb:
            try:
                disk = stack.enter_context(small_disk(base / "disk", opts.disk_mb))
            except DiskUnavailable as exc:
                env["disk_full_faults"] = f"off: {exc}"
        root = disk.path if disk else base
        cluster = stack.enter_context(postgres_cluster(parent=root))
        dsn = cluster.create_database()
        shared = {**NO_GENERATION, "store.kind": "postgres", "store.dsn": dsn, "replication.follow": "on",
                  "retrieval.min_seq_wait_s": opts.min_seq_wait_s}  # fmt: skip
        replicas = {name: Replica(shared, root / name) for name in ("A", "B")}
        for r in replicas.values():
            stack.callback(r.stop)
            r.start()
        nats_cfg, consumer = NatsConfig(), None
        if opts.nats and nats_bin():
            # Off the small disk: a JetStream that runs out of space disables itself until restarted.
            url = stack.enter_context(nats_server(base / "nats"))
            nats_cfg = NatsConfig(url=url, ack_wait_s=10, fetch_timeout_s=0.3, retry_delay_s=0.5)
            consumer = Consumer(replicas["A"].addr, {f"nats.{k}": v for k, v in nats_cfg.model_dump().items()}
                                | {"server.log_level": "WARNING"}, base / "consumer.log")  # fmt: skip
            stack.callback(consumer.stop)
            consumer.start()
        elif opts.nats:
            env["nats_writer"] = "off: nats-server is not installed"
        clients = {name: stack.enter_context(client(r.addr)) for name, r in replicas.items()}
        stop = threading.Event()
        docs = [f"{w}-{i}" for w in ("a", "b") for i in range(opts.docs_per_writer)]
        threads: list[threading.Thread] = [
            Writer("a", clients["A"], stack.enter_context(client(replicas["B"].addr)), "B", history, opts, stop),
            Writer("b", clients["B"], stack.enter_context(client(replicas["A"].addr)), "A", history, opts, stop),
            Prober({name: stack.enter_context(client(r.addr)) for name, r in replicas.items()}, history, stop),
        ]  # fmt: skip
        if consumer is not None:
            wait_for_stream(nats_cfg)
            threads.append(NatsWriter(nats_cfg.url, nats_cfg.subject, history, opts, stop))
            docs += nats_docs(opts)
        threads += [Reader(name, stack.enter_context(client(r.addr)), docs, history, opts, stop)
                    for name, r in replicas.items()]  # fmt: skip
        for t in threads:
            t.start()
        try:
            nemesis(opts, replicas, cluster, history, consumer=consumer, disk=disk)
            time.sleep(opts.calm_s)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        fence = 0
        if consumer is not None:
            env["nats_drain_s"] = drain(nats_cfg)
            (ack,) = list(clients["A"].ingest([document("fence", "The fence of the chaos run.")], timeout=CALL_S))
            fence = ack.seq  # after everything the consumer applied on A: both replicas must have it
        written = {o["doc"] for o in history.ops if o["op"] == "write"}
        recovered = final_reads(clients, sorted(written | set(docs)), history, fence_seq=fence)
    return build_result(check(history, opts, recovered), history, opts, quick=quick, command=command, env=env)


def wait_for_stream(cfg: Any, timeout_s: float = 60.0) -> None:
    """Until the consumer has created its stream (a publish before that has no one to store it)."""

    async def exists() -> bool:
        import nats

        nc = await nats.connect(cfg.url)
        try:
            await nc.jetstream().stream_info(cfg.stream)
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout_s
    while not asyncio.run(exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"kfresh consume did not create the stream {cfg.stream!r} in {timeout_s:.0f} s")
        time.sleep(0.2)


def drain(cfg: Any, timeout_s: float = 120.0) -> float:
    """Wait until the consumer has applied (or dead-lettered) every message in the stream; returns the seconds."""
    from kfresh.testing.nats import backlog

    started = time.monotonic()
    while asyncio.run(backlog(cfg.url, cfg.stream, cfg.durable)) > 0:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the NATS consumer still had messages after {timeout_s:.0f} s")
        time.sleep(0.2)
    return round(time.monotonic() - started, 2)


def final_reads(clients: dict[str, Any], docs: list[str], history: History, timeout_s: float = 30.0, *,
                fence_seq: int = 0) -> dict[str, Any]:  # fmt: skip
    """Every document on every replica once both have applied everything (WaitSearchable, then the newest seq:
    the newest acknowledged write's, or `fence_seq`, a write made after the NATS consumer drained)."""
    newest = max((o["seq"] for o in history.ops if o["op"] == "write"), default=0)
    out: dict[str, Any] = {}
    for name, c in clients.items():
        c.wait_searchable(timeout_s, timeout=timeout_s + 5)
        out[name] = {doc: read_doc(c, doc, min_seq=max(newest, fence_seq)) for doc in docs}
    return out


def allowed_final(writes: list[dict[str, Any]]) -> set[int | None]:
    """The states a document may end in: its last acknowledged write's, or any later write's whose outcome is
    unknown (it may have been applied before the error). A delete's state is None (served by no replica)."""

    def state(w: dict[str, Any]) -> int | None:
        return None if w["kind"] == "delete" else int(w["rev"])

    last_ok = max((i for i, w in enumerate(writes) if w["outcome"] == "ok"), default=-1)
    allowed: set[int | None] = {state(writes[last_ok])} if last_ok >= 0 else {None}
    allowed |= {state(w) for w in writes[last_ok + 1 :]}
    return allowed


def check(history: History, opts: ChaosOptions, recovered: dict[str, Any]) -> dict[str, Any]:
    """The checker's verdict over the whole history."""
    writes: dict[str, list[dict[str, Any]]] = {}
    for o in history.ops:
        if o["op"] == "write":
            writes.setdefault(o["doc"], []).append(o)
    for ws in writes.values():
        ws.sort(key=lambda w: w["rev"])
    lost: list[dict[str, Any]] = []
    resurrected: list[dict[str, Any]] = []
    for name, served in recovered.items():
        for doc, seen in served.items():
            allowed = allowed_final(writes.get(doc, []))
            if seen not in allowed:
                acked_delete = any(w["kind"] == "delete" and w["outcome"] == "ok" for w in writes.get(doc, []))
                (resurrected if seen is not None and None in allowed and acked_delete else lost).append(
                    {"replica": name, "doc": doc, "served": seen, "allowed": sorted(allowed, key=lambda x: -1 if x is None else x)})  # fmt: skip
    monotonic = []
    highest: dict[tuple[str, str], int] = {}
    for o in sorted((o for o in history.ops if o["op"] == "read" and o["outcome"] == "ok"), key=lambda o: o["t0"]):
        key = (o["on"], o["doc"])
        if o["seen"] is not None:
            if o["seen"] < highest.get(key, 0):
                monotonic.append({"replica": o["on"], "doc": o["doc"], "served": o["seen"], "after": highest[key],
                                  "t": o["t0"]})  # fmt: skip
            highest[key] = max(highest.get(key, 0), o["seen"])
    ryw = [o for o in history.ops if o["op"] == "ryw"]
    probes = [o for o in history.ops if o["op"] == "probe"]
    calm = [o for o in probes if not history.in_fault(o["t0"], o["t1"], opts.settle_s)]
    calm_lag = percentiles([(o["t1"] - o["t0"]) * 1000 for o in calm if o["seen"]])
    return {
        "lost": lost, "resurrected": resurrected, "monotonic": monotonic,
        "ryw_violations": [o for o in ryw if o["violated"]],
        "ryw_checked": sum(o["outcome"] == "ok" for o in ryw), "ryw_unavailable": sum(o["outcome"] != "ok" for o in ryw),
        "lag_outside_faults_ms": calm_lag, "probes_outside_faults_unseen": sum(not o["seen"] for o in calm),
        "lag_in_faults_ms": percentiles([(o["t1"] - o["t0"]) * 1000 for o in probes if o not in calm and o["seen"]]),
        "crashes": list(history.crashes),
    }  # fmt: skip


HISTORY_COLUMNS = {
    "write": ("t0", "t1", "via", "kind", "doc", "rev", "outcome", "seq"),
    "ryw": ("t0", "t1", "on", "kind", "doc", "rev", "outcome", "seen", "violated"),
    "probe": ("t0", "t1", "src", "dst", "doc", "seen"),
}


def as_rows(ops: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """One kind of operation as tab-separated rows (the JSON stays a few MB at 100 rounds)."""
    columns = HISTORY_COLUMNS[kind]
    rows = ["\t".join(str(o[c]) for c in columns) for o in ops if o["op"] == kind]
    return {"columns": "\t".join(columns), "rows": rows}


def build_result(verdict: dict[str, Any], history: History, opts: ChaosOptions, *, quick: bool, command: str,
                 env: dict[str, Any]) -> Result:  # fmt: skip
    writes = [o for o in history.ops if o["op"] == "write"]
    outcomes = Counter((o["kind"], o["outcome"]) for o in writes)
    reads = [o for o in history.ops if o["op"] == "read"]
    lag = verdict["lag_outside_faults_ms"]
    crashes = verdict.get("crashes", [])
    passed = not (verdict["lost"] or verdict["resurrected"] or verdict["monotonic"] or verdict["ryw_violations"]
                  or crashes)  # fmt: skip
    lag_met = lag["n"] > 0 and lag["p99"] <= LAG_TARGET_P99_MS and verdict["probes_outside_faults_unseen"] == 0
    result = Result(suite="chaos", title="Chaos: two replicas over PostgreSQL under random faults", command=command,
                    quick=quick, settings=opts.model_dump(), env=env,
                    raw={"history": {kind: as_rows(history.ops, kind) for kind in HISTORY_COLUMNS},
                         "faults": history.faults, "verdict": verdict,
                         "reads_by_outcome": dict(Counter(o["outcome"] for o in reads))})  # fmt: skip
    acked = sum(o["outcome"] == "ok" for o in writes)
    result.summary = {
        "passed": passed, "lag_met": lag_met, "rounds": len(history.faults), "writes": len(writes), "acked": acked,
        "unknown_outcome": len(writes) - acked, "reads": len(reads), "lost": len(verdict["lost"]),
        "resurrected": len(verdict["resurrected"]), "monotonic_violations": len(verdict["monotonic"]),
        "ryw_violations": len(verdict["ryw_violations"]), "ryw_checked": verdict["ryw_checked"],
        "ryw_unavailable": verdict["ryw_unavailable"], "lag_outside_faults_ms": lag,
        "faults": dict(Counter(f["kind"] for f in history.faults)), "crashes": len(crashes),
        "acked_via_nats": sum(o["outcome"] == "ok" and o["via"] == "n" for o in writes),
        "disk_full_writes": dict(Counter(o["outcome"] for o in writes if o["via"] != "n" and any(
            f["kind"] == "disk-full" and f["start"] <= o["t0"] <= f.get("healed", 1e18) for f in history.faults))),
    }  # fmt: skip
    s = result.summary
    result.tables.append(Table("Verdict", ["check", "violations", "over"], [
        ["acknowledged writes lost after recovery (both replicas)", s["lost"], f"{acked} acknowledged writes"],
        ["acknowledged deletes resurrected", s["resurrected"], f"{sum(o['kind'] == 'delete' and o['outcome'] == 'ok' for o in writes)} acknowledged deletes"],
        ["monotonic reads (a replica serving an older revision)", s["monotonic_violations"], f"{sum(o['outcome'] == 'ok' for o in reads)} reads"],
        ["read your writes on the other replica (min_seq)", s["ryw_violations"], f"{s['ryw_checked']} reads ({s['ryw_unavailable']} UNAVAILABLE or timed out: allowed)"],
        ["replicas that exited on their own", s["crashes"], f"{s['rounds']} faults"],
    ]))  # fmt: skip
    result.tables.append(Table("Cross-replica lag, ack -> visible on the other replica", ["when", "n", "p50 ms", "p99 ms", "max ms", "target"], [
        ["outside fault windows", lag["n"], round(lag["p50"], 1), round(lag["p99"], 1), round(lag["max"], 1),
         f"p99 <= {LAG_TARGET_P99_MS:.0f}: {'met' if lag_met else 'missed'}"],
        ["inside fault windows", verdict["lag_in_faults_ms"]["n"], round(verdict["lag_in_faults_ms"]["p50"], 1),
         round(verdict["lag_in_faults_ms"]["p99"], 1), round(verdict["lag_in_faults_ms"]["max"], 1), "-"],
    ]))  # fmt: skip

    def median_restart(kinds: tuple[str, ...]) -> Any:
        got = sorted(f["restart_s"] for f in history.faults if f["kind"] in kinds and "restart_s" in f)
        return got[len(got) // 2] if got else "-"

    result.tables.append(Table("Faults and write outcomes", ["what", "count"], [
        *[[f"fault: {k}", v] for k, v in sorted(s["faults"].items())],
        *[[f"write: {kind} {outcome}", n] for (kind, outcome), n in sorted(outcomes.items())],
        ["killed replica: start to serving, median s", median_restart(("kill",))],
        ["PostgreSQL restart (fast, immediate) to accepting, median s", median_restart(("pg-fast", "pg-immediate"))],
        ["disk full: PostgreSQL had stopped and was started again",
         sum("pg_started_s" in f for f in history.faults if f["kind"] == "disk-full")],
        ["acknowledged writes through NATS (consumer into replica A)", s["acked_via_nats"]],
        *[[f"write while the disk was full: {outcome}", n] for outcome, n in sorted(s["disk_full_writes"].items())],
    ]))  # fmt: skip
    result.notes += [
        "One 2-core machine runs PostgreSQL, both replicas, the nemesis and every client. A write whose call failed "
        "(UNAVAILABLE, DEADLINE_EXCEEDED) has an unknown outcome: the checker accepts it applied or not.",
        f"A fault window runs from the fault's start until {opts.settle_s:g} s after it healed; the lag target "
        "applies outside them.",
        "The raw history (every write, read-your-writes read and probe with its invocation and completion time, "
        "every fault) is in the JSON file; the readers' reads are checked in the run and only counted there.",
        "A failed call is followed by a pause of backoff_s before the client's next one, as a client with retries "
        "would do.",
        "The NATS writer's write is acknowledged when JetStream stored it; the consumer then applies it on replica "
        "A. Before the final reads the run waits until the consumer has no message left, then writes a fence on A "
        "whose seq both replicas must have applied. NATS keeps its files off the small disk.",
        f"The disk-full fault: PostgreSQL's files and both replicas' homes are on a {opts.disk_mb} MB tmpfs; a "
        "ballast file takes every free byte for disk_full_s, then is removed; if PostgreSQL stopped (a PANIC on a "
        "full disk), it is started again, as an operator would. "
        + (f"This run: {env['disk_full_faults']}." if "disk_full_faults" in env else ""),
    ]
    return result


def plot(result: Result, fig: Any) -> None:
    from kfresh.benchmarks.report import series_axes

    (ax,) = series_axes(fig, 1)
    probes = [row.split("\t") for row in result.raw["history"]["probe"]["rows"]]
    seen = [(float(p[0]), float(p[1])) for p in probes if p[-1] == "True"]
    ax.scatter([t0 for t0, _ in seen], [(t1 - t0) * 1000 for t0, t1 in seen], s=4, label="probe lag")
    for f in result.raw["faults"]:
        ax.axvspan(f["start"], f.get("healed", f["start"]), color="red", alpha=0.15)
    ax.set_xlabel("seconds since start (red: faults)")
    ax.set_ylabel("ack -> visible on the other replica (ms)")
    ax.set_yscale("log")
    ax.legend()
