"""The indexer's state as Prometheus gauges, read at scrape time (never mirrored into gauges that could drift)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kfresh.indexer.service import Indexer


class IndexerCollector(Collector):
    """Queue depth and corpus size, read from the indexer at scrape time."""

    def __init__(self, indexer: Indexer) -> None:
        self._indexer = indexer

    def collect(self) -> Iterator[Any]:
        stats = self._indexer.stats()
        for name, doc, value in (
            ("kfresh_ingest_queue_depth", "Acknowledged versions not yet searchable.", stats.pending),
            (
                "kfresh_ingest_queue_capacity",
                "Queue depth beyond which ingest gets RESOURCE_EXHAUSTED.",
                self._indexer.cfg.embedder.queue_size,
            ),
            ("kfresh_documents", "Live documents.", stats.documents),
            ("kfresh_chunks", "Live chunks.", stats.chunks),
            ("kfresh_indexed_vectors", "Vectors in the search index.", stats.indexed_vectors),
            (
                "kfresh_history_versions",
                "Versions the history keeps (every version not purged).",
                stats.history.versions,
            ),
            (
                "kfresh_history_memory_bytes",
                "Memory of the in-memory history copy 'as of' / 'valid at' searches use.",
                stats.history.memory_bytes,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=float(value))
