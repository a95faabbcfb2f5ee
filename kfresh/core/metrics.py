"""Prometheus metrics: what an operator of a knowledge service watches (prometheus-client exposition).

Event metrics (counters, histograms) are module-level, as prometheus-client intends: the code that sees
the event observes it. State that already lives in the indexer (queue depth, document counts) is read at
scrape time by a collector the owner hands to `MetricsEndpoint.watch` (`kfresh.indexer.metrics`) instead of being mirrored into gauges that could drift.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger("kfresh.server")

_FAST = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

DOCUMENTS_ACKED = Counter("kfresh_documents_acked", "Durably acknowledged ingest operations.", ["op", "status"])
FRESHNESS_LAG = Histogram(
    "kfresh_freshness_lag_seconds", "Acknowledgement -> searchable, per document version.", buckets=_FAST
)
REPLICA_LAG = Histogram(
    "kfresh_replica_lag_seconds",
    "Acknowledged by another replica sharing the store -> searchable on this one (includes clock skew).",
    buckets=_FAST,
)
INDEXER_STAGE = Histogram(
    "kfresh_indexer_stage_seconds", "Time the indexing worker spends per micro-batch, by stage (plan, embed, swap, save).",
    ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)  # fmt: skip
RPC_DURATION = Histogram(
    "kfresh_rpc_duration_seconds", "Server-side RPC duration by method.", ["method"], buckets=_FAST
)
RPC_TOTAL = Counter("kfresh_rpcs", "Finished RPCs by method and gRPC status code.", ["method", "code"])
QUERY_CACHE = Counter(
    "kfresh_query_embedding_cache", "Query embeddings served from the cache (hit) or computed (miss).", ["result"]
)
RETRIEVE_DURATION = Histogram(
    "kfresh_retrieve_seconds", "Embedding + vector search time of one retrieval.", buckets=_FAST
)
SEARCHES_ABANDONED = Counter(
    "kfresh_searches_abandoned",
    "Searches stopped early because their RPC was cancelled, by the last stage that ran (queued, embedded, sliced).",
    ["stage"],
)
TIME_SLICE_DURATION = Histogram(
    "kfresh_time_slice_search_seconds",
    "One 'as of' / 'valid at' search of the history (refresh of the in-memory copy, mask, scoring, texts).",
    buckets=_FAST,
)
TTFT = Histogram(
    "kfresh_time_to_first_token_seconds", "Answer start (retrieval included) -> first generated token.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)  # fmt: skip
OUTPUT_TOKENS = Counter("kfresh_output_tokens", "Generated tokens (rate() of it is tokens/s).", ["adapter"])
GENERATION_SECONDS = Counter("kfresh_generation_seconds", "Wall time spent generating answers.")
ADAPTER_SERVED = Gauge(
    "kfresh_adapter_served", "1 for the adapter version new requests get ('' = base model).", ["version"]
)
DISTILL_RUNS = Counter(
    "kfresh_distill_runs", "Finished distillation runs by outcome (published = gate passed).", ["state"]
)
GATE_CHECKS = Counter("kfresh_gate_checks", "Gate checks by name and result.", ["check", "passed"])
ADAPTERS_WITHDRAWN = Counter(
    "kfresh_adapters_withdrawn", "Adapter versions withdrawn because a document they learned was deleted or replaced."
)


def set_adapter(version: str) -> None:
    """Exactly one served version is 1; the others are removed so the series stays small."""
    ADAPTER_SERVED.clear()
    ADAPTER_SERVED.labels(version=version).set(1)


class MetricsEndpoint:
    """The /metrics HTTP endpoint and the collectors it was handed, for one server's lifetime."""

    def __init__(self, host: str, port: int, *, registry: CollectorRegistry = REGISTRY) -> None:
        self._registry = registry
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port
        self._collectors: list[Collector] = []
        log.info("metrics_listening address=http://%s:%d/metrics", host, self.port)

    def watch(self, collector: Collector) -> None:
        """Export `collector` (read at scrape time) until close(); the owner builds it (e.g. the indexer's)."""
        try:
            self._registry.register(collector)
        except ValueError:  # another server in this process already exports these gauges
            log.warning(
                "metrics_collector_skipped collector=%s reason=another server in this process exports it",
                type(collector).__name__,
            )
            return
        self._collectors.append(collector)

    def close(self) -> None:
        for collector in self._collectors:
            self._registry.unregister(collector)
        self._collectors.clear()
        self._httpd.shutdown()
        self._httpd.server_close()
