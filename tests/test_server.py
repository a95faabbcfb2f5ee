"""The gRPC service over loopback with the real indexer, the packaged models and the real vLLM engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from server_helper import ServerHandle, server_config
from server_helper import answer_once as _answer

from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.prompt import NOT_FOUND_REPLY
from kfresh.v1 import kfresh_pb2 as pb

pytestmark = pytest.mark.slow
DAY = 86_400.0
T0 = 1_790_000_000.0


_cfg = server_config


@pytest.fixture(scope="module")
def server(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    cfg = _cfg(tmp_path_factory.mktemp("server"), store__max_document_chars=5_000)
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    yield handle
    handle.stop()


@pytest.fixture()
def client(server: ServerHandle) -> Iterator[KfreshClient]:
    with KfreshClient(f"127.0.0.1:{server.port}") as c:
        c.wait_ready(timeout=120)
        yield c


def _ingest(client: KfreshClient, *docs: pb.Document) -> list[pb.IngestResponse]:
    return list(client.ingest(docs, timeout=30))


def _visible(client: KfreshClient, query: str, doc_id: str, version: int, timeout: float = 10.0) -> float:
    """Poll Retrieve until doc_id@version appears; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(c.doc_id == doc_id and c.version == version for c in client.retrieve(query, k=10).chunks):
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{doc_id} v{version} not searchable after {timeout} s")


def test_health_and_reflection(client: KfreshClient, server: ServerHandle) -> None:
    assert client.health("") == health_pb2.HealthCheckResponse.SERVING
    assert client.health(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"kfresh.v1.Kfresh", "grpc.health.v1.Health"} <= services


def test_ingest_then_retrieve_returns_the_new_document(client: KfreshClient) -> None:
    acks = _ingest(
        client, document("quill-1", "The Quillon observatory on Mount Teva opened its dome in 2031.", source="t")
    )
    assert acks[0].status == pb.ACK_STATUS_STORED and acks[0].version == 1
    assert _visible(client, "Quillon observatory dome", "quill-1", 1) < 2.0
    chunk = client.retrieve("Quillon observatory dome", k=1).chunks[0]
    assert chunk.doc_id == "quill-1" and chunk.source == "t" and "Mount Teva" in chunk.text


def test_identical_reingest_is_idempotent(client: KfreshClient) -> None:
    doc = document("same-1", "Brindle ferries carry eleven bicycles each.", metadata={"k": "v"})
    first = _ingest(client, doc)[0]
    again = _ingest(client, doc)[0]
    assert first.status == pb.ACK_STATUS_STORED
    assert again.status == pb.ACK_STATUS_UNCHANGED and again.version == first.version


def test_upsert_never_returns_the_old_version_afterwards(client: KfreshClient) -> None:
    _ingest(client, document("sal-1", "The Salvo river ferry ticket costs 3 crowns."))
    _visible(client, "Salvo river ferry ticket", "sal-1", 1)
    ack = _ingest(client, document("sal-1", "The Salvo river ferry ticket costs 9 crowns since the reform."))[0]
    assert ack.version == 2
    _visible(client, "Salvo river ferry ticket", "sal-1", 2)
    for _ in range(50):
        chunks = [c for c in client.retrieve("Salvo river ferry ticket price", k=10).chunks if c.doc_id == "sal-1"]
        assert chunks and all(c.version == 2 and "9 crowns" in c.text for c in chunks)


def test_delete_removes_from_every_later_search(client: KfreshClient) -> None:
    _ingest(client, document("gone-1", "The Orrin lighthouse keeper feeds seven cats."))
    _visible(client, "Orrin lighthouse keeper cats", "gone-1", 1)
    reply = client.delete("gone-1")
    assert reply.version == 2
    for _ in range(20):
        assert all(c.doc_id != "gone-1" for c in client.retrieve("Orrin lighthouse keeper cats", k=10).chunks)
    with pytest.raises(grpc.RpcError) as err:
        client.delete("gone-1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_metadata_filter(client: KfreshClient) -> None:
    _ingest(
        client,
        document("flt-a", "Tessel bakery sells rye loaves.", metadata={"city": "north"}),
        document("flt-b", "Tessel bakery sells wheat loaves.", metadata={"city": "south"}),
    )
    _visible(client, "Tessel bakery loaves", "flt-b", 1)
    chunks = client.retrieve("Tessel bakery loaves", k=5, filter={"city": "south"}).chunks
    assert [c.doc_id for c in chunks] == ["flt-b"]


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.RetrieveRequest(query="", k=3), "query is empty"),
        (pb.RetrieveRequest(query="x", k=-1), "k must be between"),
        (pb.RetrieveRequest(query="x", k=100_000), "k must be between"),
        (pb.AnswerRequest(question="   "), "question is empty"),
        (pb.AnswerRequest(question="x", max_tokens=10**6), "max_tokens"),
    ],
)
def test_bad_requests_are_invalid_argument(client: KfreshClient, request_: Any, needle: str) -> None:
    call = client._stub.Retrieve if isinstance(request_, pb.RetrieveRequest) else client._stub.Answer
    with pytest.raises(grpc.RpcError) as err:
        result = call(request_, timeout=10)
        list(result) if not isinstance(request_, pb.RetrieveRequest) else None
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (pb.Document(id="", text="x"), "document.id is empty"),
        (pb.Document(id="e", text="  "), "empty text"),
        (pb.Document(id="big", text="x" * 6_000), "characters"),
    ],
)
def test_bad_documents_are_invalid_argument_and_lose_nothing(
    client: KfreshClient, doc: pb.Document, needle: str
) -> None:
    good = document(f"good-before-{needle[:5]}", "Acknowledged before a bad document arrives.")
    with pytest.raises(grpc.RpcError) as err:
        list(client.ingest([good, doc], timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details() and "#2" in err.value.details()
    assert client.stats().documents >= 1
    _visible(client, "Acknowledged before a bad document arrives", good.id, 1)


def test_a_bad_message_in_a_group_commit_acknowledges_everything_before_it(client: KfreshClient) -> None:
    before = client.stats().documents
    docs = [document(f"grp-{i}", f"Group commit document number {i} about the Quillon estuary.") for i in range(120)]
    docs[99] = pb.Document(id="grp-bad", text="x" * 6_000)  # rejected by the indexer, inside a group
    acks: list[pb.IngestResponse] = []
    with pytest.raises(grpc.RpcError) as err:
        for ack in client.ingest(docs, timeout=60):
            acks.append(ack)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "#100" in err.value.details()
    assert [a.id for a in acks] == [f"grp-{i}" for i in range(99)]
    assert client.stats().documents == before + 99
    _visible(client, "Group commit document number 98 about the Quillon estuary", "grp-98", 1)


def test_wait_searchable_returns_once_everything_acknowledged_is_searchable(client: KfreshClient) -> None:
    docs = [document(f"ws-{i}", f"Bulk loaded note {i} about the Vantor lighthouse keepers.") for i in range(40)]
    assert len(list(client.ingest(docs, timeout=60))) == 40
    reply = client.wait_searchable(60.0)
    assert reply.searchable and reply.applied_seq >= reply.target_seq > 0
    # No polling: the very next Retrieve already sees the last document of the load.
    hits = client.retrieve("Bulk loaded note 39 about the Vantor lighthouse keepers.", k=3).chunks
    assert any(h.doc_id == "ws-39" for h in hits)
    assert client.wait_searchable(1.0).searchable  # nothing pending: returns at once
    for bad in (-1.0, 4000.0, float("nan")):
        with pytest.raises(grpc.RpcError) as err:
            client.wait_searchable(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout_s" in err.value.details()


def test_cli_ingest_wait_reports_searchable(server: ServerHandle, client: KfreshClient, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import json

    from kfresh.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"cli-w-{i}", "text": f"Ferry timetable {i} for the Oskel crossing."}) + "\n"
                           for i in range(20)))  # fmt: skip
    assert main(["ingest", str(src), "--addr", f"127.0.0.1:{server.port}", "--quiet", "--wait", "60"]) == 0
    out = capsys.readouterr().out
    assert "stored=20" in out and "searchable: yes" in out
    assert any(
        h.doc_id == "cli-w-19" for h in client.retrieve("Ferry timetable 19 for the Oskel crossing.", k=3).chunks
    )


def test_unknown_fields_are_invalid_argument(server: ServerHandle, client: KfreshClient) -> None:
    raw = pb.RetrieveRequest(query="hello", k=2).SerializeToString() + b"\xf8\x06\x01"  # field 111 = 1
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(
            "/kfresh.v1.Kfresh/Retrieve", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown field" in err.value.details()
    assert client.health(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING


def test_answer_is_grounded_streamed_and_cited(client: KfreshClient) -> None:
    _ingest(client, document("zorb-h", "The Zorbian Tower in Velmora is 812 metres tall.", source="velmora-guide"))
    _visible(client, "How tall is the Zorbian Tower?", "zorb-h", 1)
    text, done = _answer(client, "How tall is the Zorbian Tower?")
    assert "812" in text
    assert done.citations and done.citations[-1].doc_id == "zorb-h" and done.citations[-1].primary
    assert done.output_tokens > 0 and done.timings.time_to_first_token_ms > 0
    assert done.timings.total_ms >= done.timings.time_to_first_token_ms >= done.timings.retrieval_ms > 0


def test_answer_cites_the_newest_of_two_conflicting_documents(client: KfreshClient) -> None:
    _ingest(
        client,
        document("arch-old", "The chief architect of the Pellucid Library is Anneke Roos.", valid_from=T0),
        document("arch-new", "The chief architect of the Pellucid Library is Tomas Dunmore.", valid_from=T0 + DAY),
    )
    _visible(client, "chief architect of the Pellucid Library", "arch-new", 1)
    _visible(client, "chief architect of the Pellucid Library", "arch-old", 1)
    text, done = _answer(client, "Who is the chief architect of the Pellucid Library?")
    primary = [c for c in done.citations if c.primary]
    assert [c.doc_id for c in primary] == ["arch-new"]
    assert "arch-old" in [c.doc_id for c in done.superseded]
    assert "Dunmore" in text and "Roos" not in text


def test_an_unlinked_correction_worded_afresh_wins_over_its_story(client: KfreshClient) -> None:
    # Cosine 0.49 between the two, under answer.conflict_similarity (0.65): they are versions of one fact only
    # because both name "Quillon", which the question asks about and no other passage holds. The filter keeps the
    # module's other documents out of the k kept (the correction ranks below the story on the question).
    meta = {"case": "observatory"}
    _ingest(
        client,
        document("obs-old", "The Quillon Observatory appointed astronomer Maren Vosk as its director last spring.",
                 valid_from=T0, metadata=meta),
        document("obs-new", "After an ethics review, trustees at Quillon installed physicist Hale Ardent to run the "
                 "observatory instead.", valid_from=T0 + DAY, metadata=meta),
    )  # fmt: skip
    question = "Who is the director of the Quillon Observatory?"
    _visible(client, question, "obs-new", 1)
    _visible(client, question, "obs-old", 1)
    text, done = _answer(client, question, filter=meta)
    assert [c.doc_id for c in done.citations if c.primary] == ["obs-new"]
    assert [c.doc_id for c in done.superseded] == ["obs-old"]
    assert "Ardent" in text and "Vosk" not in text


def test_answer_quotes_the_sentence_that_answers_after_the_models_words(client: KfreshClient) -> None:
    sentence = "The Ostrava ferry museum keeps 74 brass lamps in its east hall."
    _ingest(
        client,
        document(
            "ostr-q", f"The Ostrava ferry museum opened in 1911 beside the river. {sentence}", source="ostrava-guide"
        ),
    )
    question = "How many brass lamps does the Ostrava ferry museum keep?"
    _visible(client, question, "ostr-q", 1)
    text, done = _answer(client, question)
    assert [c.doc_id for c in done.citations] == ["ostr-q"]  # the one passage the model read
    # The sentence is in the reply exactly once: the model said it, or it follows the answer with its passage number.
    assert text.count(sentence) == 1
    assert text.endswith(f'[1] "{sentence}"') or "[1]" not in text


def test_no_passage_above_the_bar_answers_not_in_the_documents(client: KfreshClient) -> None:
    text, done = _answer(client, "Who won the Kessarine chess open?", filter={"no-such-key": "x"})
    assert text == NOT_FOUND_REPLY and done.finish_reason == "not_found"
    assert not done.citations and done.output_tokens == 0


def test_closed_book_answer_has_no_citations(client: KfreshClient) -> None:
    text, done = _answer(client, "What is the capital of France?", closed_book=True)
    assert text.strip() and not done.citations and done.timings.retrieval_ms < 5


def test_deadline_aborts_and_server_keeps_serving(client: KfreshClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(client.answer("Write a long story about the sea.", max_tokens=1000, timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    text, _ = _answer(client, "Say hello.", closed_book=True, max_tokens=8)
    assert text.strip()


@pytest.mark.parametrize("rpc", ["Answer", "Retrieve"])
def test_a_cancelled_call_stops_its_search_before_the_index(
    server: ServerHandle, client: KfreshClient, monkeypatch: pytest.MonkeyPatch, rpc: str
) -> None:
    """The client cancels while its query is being embedded (held there: fault injection). The search stops at
    the next stage: the vector index and the store are never read for it, and the server keeps serving."""
    from prometheus_client import REGISTRY

    from kfresh.v1 import kfresh_pb2_grpc as pb_grpc

    indexer = server.runtime.require_indexer()
    real_search, real_encode, real_index = indexer.search, indexer.query_embeddings.encode, indexer._search
    entered, cancels, searched = threading.Event(), [], []

    def search(*args: Any, **kwargs: Any) -> Any:
        cancels.append(kwargs.get("cancel"))
        return real_search(*args, **kwargs)

    def held_encode(query: str) -> Any:
        entered.set()
        if cancels[-1] is not None:
            cancels[-1].wait(10)  # until the server sees the call cancelled
        else:
            time.sleep(2)  # nothing to wait on: a search that cannot be stopped
        return real_encode(query)

    monkeypatch.setattr(indexer, "search", search)
    monkeypatch.setattr(indexer.query_embeddings, "encode", held_encode)
    monkeypatch.setattr(indexer, "_search", lambda *a, **kw: searched.append(a) or real_index(*a, **kw))
    sample = lambda: REGISTRY.get_sample_value("kfresh_searches_abandoned_total", {"stage": "embedded"}) or 0  # noqa: E731
    before = sample()
    question = f"Which harbour does the {rpc} cancellation test ask about?"
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.KfreshStub(channel)
        if rpc == "Answer":
            call = stub.Answer(pb.AnswerRequest(question=question, k=3), timeout=30)
        else:
            call = stub.Retrieve.future(pb.RetrieveRequest(query=question, k=3), timeout=30)
        assert entered.wait(10), "the search never reached the query embedding"
        call.cancel()
        deadline = time.monotonic() + 15
        while sample() == before and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sample() == before + 1, "the cancelled search was not stopped"
    assert searched == [], "the cancelled search still read the vector index"
    monkeypatch.undo()
    assert client.retrieve("harbour", k=1, timeout=10) is not None


def test_unknown_adapter_is_not_found(client: KfreshClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _answer(client, "Hi?", adapter="v999")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_search_while_ingesting(client: KfreshClient) -> None:
    docs = [document(f"bulk-{i}", f"Bulk note {i}: the Harrow depot stores crate number {i * 7}.") for i in range(60)]
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            _ingest(client, *docs)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=ingest)
    thread.start()
    while thread.is_alive():
        for chunk in client.retrieve("Harrow depot crate", k=10).chunks:
            if chunk.doc_id.startswith("bulk-"):  # every hit resolves to its own document's text
                assert chunk.text.startswith(f"Bulk note {chunk.doc_id[5:]}:") and chunk.version == 1
    thread.join()
    assert not errors
    _visible(client, "Bulk note 59: the Harrow depot stores crate number 413.", "bulk-59", 1)


def test_stats_report_counts_lag_and_model(client: KfreshClient) -> None:
    stats = client.stats()
    assert stats.documents > 0 and stats.chunks >= stats.documents
    assert stats.freshness.count > 0 and stats.freshness.p50_ms > 0
    assert stats.model and stats.model_ready and stats.generation_backend
    assert stats.index_kind and stats.embedder


def test_remote_backend_streams_a_grounded_answer(engine_loop: Any, remote_vllm_server: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, generation__backend="remote", generation__remote_url=remote_vllm_server)
    handle = ServerHandle(engine_loop, cfg, None)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as c:
            c.wait_ready(timeout=120)
            _ingest(c, document("rem-1", "The Ostrava glass museum keeps 4,200 lamps.", source="museum"))
            _visible(c, "How many lamps does the Ostrava glass museum keep?", "rem-1", 1)
            text, done = _answer(c, "How many lamps does the Ostrava glass museum keep?")
            assert "4,200" in text or "4200" in text
            assert done.citations[-1].doc_id == "rem-1" and c.stats().generation_backend == "remote"
    finally:
        handle.stop()
