"""LangChain over a live kfresh server: Documents in, a retriever, a streaming chat model with citations."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from server_helper import ServerHandle, server_config

from kfresh.client import KfreshClient
from kfresh.client.langchain import ChatKfresh, KfreshRetriever, ingest_documents
from kfresh.v1 import kfresh_pb2 as pb

DOCS = [
    Document(id="lc-ferry", page_content="The Velmora night ferry leaves from Pier 14 at 23:10.",
             metadata={"source": "harbour/timetable", "lang": "en"}),
    Document(page_content="The Velmora lighthouse is painted ochre and white.", metadata={"id": "lc-lighthouse", "year": 2026}),
]  # fmt: skip


@pytest.fixture(scope="module")
def addr(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = ServerHandle(engine_loop, server_config(tmp_path_factory.mktemp("langchain")), vllm_backend)
    address = f"127.0.0.1:{handle.port}"
    acks = ingest_documents(DOCS, addr=address, timeout=30)
    assert [a.status for a in acks] == [pb.ACK_STATUS_STORED] * 2 and [a.id for a in acks] == [
        "lc-ferry",
        "lc-lighthouse",
    ]
    with KfreshClient(address) as client:
        client.wait_ready(timeout=120)
        deadline = time.monotonic() + 30
        while {c.doc_id for c in client.retrieve("Velmora", k=5).chunks} != {"lc-ferry", "lc-lighthouse"}:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    yield address
    handle.stop()


def test_documents_without_an_id_are_refused_before_anything_is_sent(addr: str) -> None:
    with pytest.raises(ValueError, match="no id"):
        ingest_documents([Document(page_content="An orphan.")], addr=addr, timeout=10)


def test_retriever_returns_fresh_documents_with_provenance(addr: str, engine_loop: Any) -> None:
    retriever = KfreshRetriever(addr=addr, k=2)
    docs = retriever.invoke("Which pier does the night ferry leave from?")
    assert docs and docs[0].metadata["doc_id"] == "lc-ferry" and "Pier 14" in docs[0].page_content
    top = docs[0].metadata
    assert top["source"] == "harbour/timetable" and top["lang"] == "en" and top["version"] == 1 and top["score"] > 0
    filtered = KfreshRetriever(addr=addr, k=2, filter={"year": "2026"}).invoke("ferry")
    assert [d.metadata["doc_id"] for d in filtered] == ["lc-lighthouse"]
    adocs = engine_loop.run(retriever.ainvoke("What colour is the lighthouse?"), timeout=30)
    assert adocs[0].metadata["doc_id"] == "lc-lighthouse"


def test_chat_model_streams_a_cited_answer(addr: str, engine_loop: Any) -> None:
    chat = ChatKfresh(addr=addr, max_tokens=24)
    chunks = list(chat.stream([SystemMessage(content="ignored: the server frames the prompt"),
                               HumanMessage(content="Which pier does the Velmora night ferry leave from?")]))  # fmt: skip
    text = "".join(c.content for c in chunks)
    assert len(chunks) > 2 and "14" in text, text
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk  # LangChain may add its own closing chunk: the citations are in the merged message
    cited = [c["doc_id"] for c in merged.response_metadata["citations"]]
    assert "lc-ferry" in cited and merged.response_metadata["finish_reason"]

    reply = chat.invoke("What colour is the Velmora lighthouse?")
    assert isinstance(reply, AIMessage) and reply.content
    assert "lc-lighthouse" in [c["doc_id"] for c in reply.response_metadata["citations"]]

    async def astream() -> str:
        return "".join([c.content async for c in chat.astream("Which pier does the night ferry leave from?")])

    assert "14" in engine_loop.run(astream(), timeout=120)
    with pytest.raises(ValueError, match="human message"):
        chat.invoke([SystemMessage(content="no question here")])


def test_retriever_composes_in_a_chain(addr: str) -> None:
    from langchain_core.runnables import RunnableLambda

    chain = KfreshRetriever(addr=addr, k=1) | RunnableLambda(lambda docs: docs[0].metadata["doc_id"])
    assert chain.invoke("lighthouse colour") == "lc-lighthouse"


def test_langchain_module_imports_without_a_server(tmp_path: Path) -> None:
    chat = ChatKfresh(addr="127.0.0.1:9", timeout=2)  # nothing listens: a clear gRPC error, not a hang
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        chat.invoke("hello?")
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
