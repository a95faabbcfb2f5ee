"""kfresh: keep an LLM's knowledge fresh (streaming retrieval + vLLM answers over gRPC)."""

from __future__ import annotations

__version__ = "0.1.0"
