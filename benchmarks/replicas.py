"""replicas: freshness across two kfresh replicas sharing one PostgreSQL store, beside the lag on the replica
that acknowledged.

Two `kfresh serve` processes (A and B, no generation) share a throwaway PostgreSQL cluster (or --set
dsn=...); each has its own FAISS index and follows the shared change log. A background Ingest stream
keeps A busy at `load_docs_per_s`. Each probe ingests one new document into A and, from the moment the
acknowledgement arrives, two threads poll Retrieve on A and on B until the document shows up: the lag on
the replica that acknowledged (the single-machine baseline) and on the other one, in the same run.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment, ms_since, percentiles
from kfresh.benchmarks.report import Result, Table

TARGET_P95_MS = 500.0  # "searchable within a fraction of a second" on every replica
PROBE_TIMEOUT_S = 10.0


class ReplicasOptions(SuiteOptions):
    probes: int = Field(200, ge=1, description="Documents ingested into replica A and looked for on A and B.")
    load_docs_per_s: float = Field(5.0, ge=0, description="Background ingest rate into A while probing (0 = none).")
    dsn: str = Field(
        "", description="PostgreSQL to use; '' = a throwaway cluster (needs Debian's postgresql binaries)."
    )

    @classmethod
    def quick(cls) -> ReplicasOptions:
        return cls(probes=4, load_docs_per_s=1.0)


def _text(i: int) -> str:
    from kfresh.benchmarks import corpus

    return corpus.text(7_000_000 + i)


def _first_hit(poller: Any, doc_id: str, text: str, acked: float, out: dict[str, float], key: str) -> None:
    while time.perf_counter() - acked < PROBE_TIMEOUT_S:
        if any(ch.doc_id == doc_id for ch in poller.retrieve(text, k=3, timeout=30).chunks):
            out[key] = ms_since(acked)
            return
    out[key] = PROBE_TIMEOUT_S * 1000


def probe(a: Any, poll_a: Any, poll_b: Any, doc_id: str, text: str) -> tuple[float, float]:
    """Ingest into A; (ms until A serves it, ms until B serves it), both from the acknowledgement. The pollers
    are connected clients, so no connection set-up lands inside a lag."""
    from kfresh.client import document

    list(a.ingest([document(doc_id, text, source="probe")], timeout=30))
    acked = time.perf_counter()
    out: dict[str, float] = {}
    pollers = [threading.Thread(target=_first_hit, args=(poller, doc_id, text, acked, out, key))
               for poller, key in ((poll_a, "a"), (poll_b, "b"))]  # fmt: skip
    for t in pollers:
        t.start()
    for t in pollers:
        t.join()
    return out["a"], out["b"]


def run(opts: ReplicasOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    import contextlib

    from kfresh.client import document
    from kfresh.testing.load import BackgroundIngest
    from kfresh.testing.pgcluster import postgres_server
    from kfresh.testing.servers import NO_GENERATION, client, kfresh_server

    if addr:
        raise SystemExit("the replicas suite starts its own two replicas; --addr is not supported")
    env = environment(server="2 x kfresh serve over one PostgreSQL, no generation")
    run_id = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        dsn = opts.dsn or stack.enter_context(postgres_server())
        shared = {**NO_GENERATION, "store.kind": "postgres", "store.dsn": dsn, "replication.follow": "on"}
        a = stack.enter_context(kfresh_server(shared))
        b = stack.enter_context(kfresh_server(shared))
        lags_a, lags_b = [], []
        load_docs = (document(f"load-{run_id}-{i}", _text(1_000_000 + i), source="load") for i in range(10**9))
        load_cm = (
            BackgroundIngest(a.addr, load_docs, opts.load_docs_per_s)
            if opts.load_docs_per_s
            else contextlib.nullcontext()
        )
        with load_cm as load, client(a.addr) as ca, client(a.addr) as poll_a, client(b.addr) as poll_b:
            poll_a.stats(), poll_b.stats()  # connect now
            time.sleep(0.5)
            for i in range(opts.probes):
                lag_a, lag_b = probe(ca, poll_a, poll_b, f"probe-{run_id}-{i}", _text(i))
                lags_a.append(lag_a)
                lags_b.append(lag_b)
        with client(a.addr) as ca, client(b.addr) as cb:
            docs = (ca.stats().documents, cb.stats().documents)
    return _result(opts, quick, command, env=env, lags_a=lags_a, lags_b=lags_b, load=load, docs=docs)


def _result(opts: ReplicasOptions, quick: bool, command: str, **m: Any) -> Result:
    la, lb = percentiles(m["lags_a"]), percentiles(m["lags_b"])
    load = m["load"]
    achieved = round(load.achieved_rate, 1) if load is not None else 0.0
    result = Result(
        suite="replicas", title="Freshness across two replicas sharing one PostgreSQL", command=command, quick=quick,
        settings=opts.model_dump(exclude={"dsn"}), env=m["env"], raw={"lag_a_ms": m["lags_a"], "lag_b_ms": m["lags_b"]},
    )  # fmt: skip
    timeouts = sum(1 for x in m["lags_b"] if x >= PROBE_TIMEOUT_S * 1000)
    result.summary = {
        "lag_acknowledging_replica_ms": {k: round(v, 1) for k, v in la.items()},
        "lag_other_replica_ms": {k: round(v, 1) for k, v in lb.items()},
        "other_minus_acknowledging_p50_ms": round(lb["p50"] - la["p50"], 1),
        "meets_target": lb["p95"] <= TARGET_P95_MS and timeouts == 0, "probe_timeouts": timeouts,
        "load_achieved_docs_per_s": achieved, "documents_seen_by_a_and_b": list(m["docs"]),
    }  # fmt: skip
    rows = [["A (acknowledged it)", la["p50"], la["p95"], la["p99"], la["max"], "baseline"],
            ["B (other replica)", lb["p50"], lb["p95"], lb["p99"], lb["max"],
             f"p95 <= {TARGET_P95_MS:.0f}: {'met' if result.summary['meets_target'] else 'missed'}"]]  # fmt: skip
    result.tables.append(Table(
        f"ack on A -> first Retrieve hit, {la['n']} probes, {achieved} docs/s of background ingest into A",
        ["replica", "p50 ms", "p95 ms", "p99 ms", "max ms", "target"], rows,
    ))  # fmt: skip
    result.notes += [
        "B applies A's change from the shared change log (LISTEN/NOTIFY wake-up) with A's stored embeddings: the "
        "difference to A is the wait for A's embedding commit, the notification and B's index insert.",
        "Each poll is one Retrieve call; both pollers start when the acknowledgement arrives. One 2-core machine runs "
        "PostgreSQL, both replicas and the client.",
    ]
    return result


def plot(result: Result, fig: Any) -> None:
    from kfresh.benchmarks.report import series_axes

    (ax,) = series_axes(fig, 1)
    for key, label in (("lag_a_ms", "A (acknowledged)"), ("lag_b_ms", "B (other replica)")):
        lags = sorted(result.raw[key])
        ax.plot(lags, [(i + 1) / len(lags) for i in range(len(lags))], label=label)
    ax.axvline(TARGET_P95_MS, color="grey", linestyle="--", label="p95 target")
    ax.set_xlabel("ack -> Retrieve hit (ms)")
    ax.set_ylabel("share of probes")
    ax.legend()
