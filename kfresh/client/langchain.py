"""LangChain over a running kfresh server: a retriever (Retrieve), a streaming chat model (Answer) and
ingestion of LangChain `Document`s (Ingest).

    from kfresh.client.langchain import ChatKfresh, KfreshRetriever, ingest_documents
    ingest_documents(docs, addr="127.0.0.1:50051")
    retriever = KfreshRetriever(addr="127.0.0.1:50051", k=4)
    chat = ChatKfresh(addr="127.0.0.1:50051")
    for chunk in chat.stream("Where does the ferry leave from?"): print(chunk.content, end="")

The server does the retrieval-augmented part (fresh passages, newest wins, citations), so the chat model
sends only the last human message as the question; citations arrive in the final chunk's
`response_metadata`. Connection keywords (`token`, `credentials`, `server_name`) pass through
`client_options` to `kfresh.client.KfreshClient`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import Field

from kfresh.client import DEFAULT_ADDR, AsyncKfreshClient, KfreshClient, document, where
from kfresh.v1 import kfresh_pb2 as pb


def chunk_to_document(chunk: pb.Chunk) -> Document:
    """A retrieved chunk as a LangChain Document; kfresh's identity and provenance go into metadata."""
    metadata: dict[str, Any] = dict(chunk.metadata)
    metadata.update(doc_id=chunk.doc_id, version=chunk.version, chunk_id=chunk.chunk_id, ordinal=chunk.ordinal,
                    source=chunk.source, score=chunk.score, valid_from=chunk.valid_from.ToDatetime().isoformat())  # fmt: skip
    if chunk.HasField("acked_at"):
        metadata["acked_at"] = chunk.acked_at.ToDatetime().isoformat()
    return Document(page_content=chunk.text, metadata=metadata, id=f"{chunk.doc_id}#{chunk.chunk_id}")


def _citations(done: pb.AnswerDone) -> list[dict[str, Any]]:
    return [{"index": c.index, "doc_id": c.doc_id, "version": c.version, "source": c.source, "primary": c.primary,
             "text": c.text} for c in done.citations]  # fmt: skip


class KfreshRetriever(BaseRetriever):
    """Fresh chunks from kfresh's Retrieve: newest indexed version of each document only."""

    addr: str = DEFAULT_ADDR
    k: int = Field(4, ge=1, description="Chunks per query.")
    filter: dict[str, str] = Field(default_factory=dict, description="Exact-match metadata filter.")
    where: dict[str, Any] = Field(
        default_factory=dict,
        description="More conditions, as kfresh.client.where() takes them: any_of, source, valid_from_min/max.",
    )
    as_of: float | None = Field(None, description="Unix seconds: the knowledge base as it stood then (history).")
    valid_at: float | None = Field(None, description="Unix seconds: what the documents say was true then.")
    timeout: float | None = 30.0
    client_options: dict[str, Any] = Field(default_factory=dict)

    def _where(self) -> pb.Filter | None:
        return where(**self.where) if self.where else None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        with KfreshClient(self.addr, **self.client_options) as client:
            reply = client.retrieve(query, k=self.k, filter=self.filter, where=self._where(), timeout=self.timeout,
                                    as_of=self.as_of, valid_at=self.valid_at)  # fmt: skip
        return [chunk_to_document(c) for c in reply.chunks]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        async with AsyncKfreshClient(self.addr, **self.client_options) as client:
            reply = await client.retrieve(
                query, k=self.k, filter=self.filter, where=self._where(), timeout=self.timeout, as_of=self.as_of,
                valid_at=self.valid_at,
            )  # fmt: skip
        return [chunk_to_document(c) for c in reply.chunks]


class ChatKfresh(BaseChatModel):
    """kfresh's Answer as a LangChain chat model: streamed, grounded in fresh passages, cited."""

    addr: str = DEFAULT_ADDR
    k: int = Field(0, ge=0, description="Passages to retrieve (0 = the server default).")
    max_tokens: int = Field(0, ge=0, description="0 = the server default.")
    temperature: float | None = None
    adapter: str = Field("", description="Adapter version; '' = the served one, 'none' = the base model.")
    closed_book: bool = False
    filter: dict[str, str] = Field(default_factory=dict)
    as_of: float | None = Field(None, description="Unix seconds: answer from the knowledge base as it stood then.")
    valid_at: float | None = Field(None, description="Unix seconds: answer from what was true then.")
    timeout: float | None = 300.0
    client_options: dict[str, Any] = Field(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "kfresh"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"addr": self.addr, "k": self.k, "adapter": self.adapter, "closed_book": self.closed_book}

    def _options(self) -> dict[str, Any]:
        return {"k": self.k, "max_tokens": self.max_tokens, "temperature": self.temperature, "adapter": self.adapter,
                "closed_book": self.closed_book, "filter": self.filter, "as_of": self.as_of,
                "valid_at": self.valid_at}  # fmt: skip

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:  # fmt: skip
        text: list[str] = []
        meta: dict[str, Any] = {}
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            text.append(str(chunk.message.content))
            meta.update(chunk.message.response_metadata)
        return ChatResult(
            generations=[ChatGeneration(message=AIMessage(content="".join(text), response_metadata=meta))]
        )

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:  # fmt: skip
        with KfreshClient(self.addr, **self.client_options) as client:
            for event in client.answer(_question(messages), timeout=self.timeout, **self._options()):
                chunk = _to_chunk(event)
                if run_manager and event.HasField("delta"):
                    run_manager.on_llm_new_token(event.delta, chunk=chunk)
                yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:  # fmt: skip
        async with AsyncKfreshClient(self.addr, **self.client_options) as client:
            async for event in client.answer(_question(messages), timeout=self.timeout, **self._options()):
                chunk = _to_chunk(event)
                if run_manager and event.HasField("delta"):
                    await run_manager.on_llm_new_token(event.delta, chunk=chunk)
                yield chunk


def _question(messages: list[BaseMessage]) -> str:
    for message in reversed(messages):
        if isinstance(message, HumanMessage) and isinstance(message.content, str) and message.content.strip():
            return message.content
    raise ValueError("ChatKfresh needs a human message with text: it is the question kfresh answers")


def _to_chunk(event: pb.AnswerResponse) -> ChatGenerationChunk:
    if event.HasField("delta"):
        return ChatGenerationChunk(message=AIMessageChunk(content=event.delta))
    done = event.done
    meta = {"citations": _citations(done), "superseded": [c.doc_id for c in done.superseded], "adapter": done.adapter,
            "model_name": done.model, "finish_reason": done.finish_reason, "output_tokens": done.output_tokens,
            "time_to_first_token_ms": done.timings.time_to_first_token_ms}  # fmt: skip
    return ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=meta))


def ingest_documents(
    docs: Iterable[Document], *, addr: str = DEFAULT_ADDR, id_key: str = "id", timeout: float | None = None,
    client_options: dict[str, Any] | None = None,
) -> list[pb.IngestResponse]:  # fmt: skip
    """Upsert LangChain Documents; each is acknowledged once durable. The id is `doc.id`, else
    `metadata[id_key]`; `metadata["source"]` becomes the source; other metadata values become strings.
    Every document is converted (and checked) before the stream opens, so a bad one sends nothing."""
    messages = [_to_document(doc, position, id_key) for position, doc in enumerate(docs, 1)]
    with KfreshClient(addr, **(client_options or {})) as client:
        return list(client.ingest(messages, timeout=timeout))


def _to_document(doc: Document, position: int, id_key: str) -> pb.Document:
    doc_id = doc.id or doc.metadata.get(id_key)
    if not doc_id:
        raise ValueError(f"document #{position} has no id: set Document.id or metadata[{id_key!r}]")
    meta = {str(k): str(v) for k, v in doc.metadata.items() if k not in (id_key, "source")}
    return document(str(doc_id), doc.page_content, source=str(doc.metadata.get("source", "")), metadata=meta)
