"""Shared by the fault tests (tests/test_faults*.py): poll for a condition, and find one document by id."""

from __future__ import annotations

import time
from typing import Any

from kfresh.client import KfreshClient


def _found(client: KfreshClient, doc_id: str, text: str) -> bool:
    chunks = client.retrieve(text, k=1, filter={"doc": doc_id}, timeout=30).chunks
    return bool(chunks) and chunks[0].doc_id == doc_id


def _wait(cond: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
