"""The client SDK: blocking and asyncio gRPC clients (`clients`), file sources for ingest (`sources`), the
LangChain retriever and chat model (`langchain`) and the NATS JetStream consumer (`nats_ingest`).

The clients are re-exported here: `from kfresh.client import KfreshClient, document`.
"""

from __future__ import annotations

from kfresh.client.clients import (
    DEFAULT_ADDR,
    SERVICE_NAME,
    AsyncKfreshClient,
    KfreshClient,
    Session,
    connect_options,
    document,
    tls_credentials,
    where,
)

__all__ = [
    "DEFAULT_ADDR",
    "SERVICE_NAME",
    "AsyncKfreshClient",
    "KfreshClient",
    "Session",
    "connect_options",
    "document",
    "tls_credentials",
    "where",
]
