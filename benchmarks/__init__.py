"""kfresh benchmark suites (`kfresh bench SUITE`): ingest, freshness, retrieval, answer, knowledge."""
