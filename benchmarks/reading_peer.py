"""The peer in the reading suite: a LangChain retrieval chain on the same embedder, k and vLLM model.

What a user would build instead of kfresh: LangChain's FAISS vector store over the same MiniLM vectors,
the common RAG prompt (context and question together in one user message), and `ChatOpenAI` pointed at the
same `vllm serve`, so the model renders it with its plain chat template.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from kfresh.benchmarks.realtimeqa import Question

# The widely used LangChain RAG prompt (the "rag-prompt" of the LangChain hub), as the user message.
RAG_PROMPT = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to answer "
    "the question. If you don't know the answer, just say that you don't know. Use three sentences maximum and "
    "keep the answer concise.\nQuestion: {question} \nContext: {context} \nAnswer:"
)


def build_store(corpus: Sequence[Question], encode: Any) -> Any:
    """A LangChain FAISS vector store over every evidence passage (ids = question ids)."""
    from langchain_community.vectorstores import FAISS
    from langchain_core.documents import Document

    from kfresh.benchmarks.retrieval import _langchain_embeddings

    docs = [Document(page_content=q.evidence, metadata={"id": q.id, "date": q.date}) for q in corpus]
    return FAISS.from_documents(docs, _langchain_embeddings(encode), distance_strategy="MAX_INNER_PRODUCT")


def chain(store: Any, url: str, *, k: int, max_tokens: int) -> Any:
    """retriever | prompt | ChatOpenAI(vllm serve) | text, in LangChain Expression Language."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableParallel, RunnablePassthrough
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="SmolLM2-135M-Instruct", temperature=0.0,
                     max_completion_tokens=max_tokens, timeout=600, max_retries=0)  # fmt: skip
    retriever = store.as_retriever(search_kwargs={"k": k})
    prompt = ChatPromptTemplate.from_messages([("user", RAG_PROMPT)])

    def join(docs: list[Any]) -> str:
        return "\n\n".join(d.page_content for d in docs)

    answer = prompt | llm | StrOutputParser()
    return RunnableParallel(docs=retriever, question=RunnablePassthrough()).assign(
        answer=(lambda x: {"context": join(x["docs"]), "question": x["question"]}) | answer
    )


async def ask_all(
    store: Any, url: str, questions: Sequence[Question], *, k: int, max_tokens: int, concurrency: int
) -> list[dict[str, Any]]:
    """Each question through the chain; per question the answer and the ids it retrieved."""
    runnable = chain(store, url, k=k, max_tokens=max_tokens)
    slots = asyncio.Semaphore(concurrency)

    async def one(q: Question) -> dict[str, Any]:
        async with slots:
            out = await runnable.ainvoke(q.question)
        return {"id": q.id, "answer": out["answer"], "retrieved": [d.metadata["id"] for d in out["docs"]]}

    return list(await asyncio.gather(*(one(q) for q in questions)))
