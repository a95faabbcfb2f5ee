"""Hostile input: hypothesis drives every RPC of a real server (real indexer, real vLLM engine) over loopback.

Two kinds of cases:
- structured: well-formed messages with random, empty, huge and odd-Unicode fields, extreme numbers;
- raw: random bytes, truncated or bit-flipped encodings, invalid UTF-8 inside string fields, sent through
  a generic channel with identity serializers (a proto library would refuse to build them).

The server may answer any status except INTERNAL and UNKNOWN, and must stay healthy: Stats works at the
end and a document acknowledged before the fuzzing is still retrievable. The number of cases run is
printed at the end of the session line ("fuzz cases: ..."). `make reliability` runs KFRESH_FUZZ_SCALE (5) times
as many cases (over 10,000) and records the counts in benchmarks/results/reliability-<date>.*; every RPC of the
service is fuzzed (checked at the end).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helper import LONG, record
from server_helper import ServerHandle, server_config

from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.v1 import kfresh_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # `make reliability` runs it SCALE times larger
COUNTS: collections.Counter[str] = collections.Counter()
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CANARY = ("fuzz-canary", "The Ombra canal lock lifts barges nine metres.")
SCALE = int(os.environ.get("KFRESH_FUZZ_SCALE", "5" if LONG else "1"))


def examples(n: int) -> settings:
    """Hypothesis settings for n cases per test (times SCALE)."""
    return settings(max_examples=n * SCALE, deadline=None, database=None, suppress_health_check=list(HealthCheck))


FAST = examples(150)
SLOW = examples(25)


@pytest.fixture(scope="module")
def server(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """Short answers (at most 8 tokens) so Answer cases stay quick on a CPU."""
    cfg = server_config(
        tmp_path_factory.mktemp("fuzz"),
        store__max_document_chars=20_000,
        answer__max_tokens=4,
        answer__max_tokens_limit=8,
        retrieval__min_seq_wait_s=0.05,  # a min_seq from the future waits this long, then UNAVAILABLE
    )
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server: ServerHandle, request: pytest.FixtureRequest) -> Iterator[KfreshClient]:
    started = time.monotonic()
    with KfreshClient(f"127.0.0.1:{server.port}") as c:
        c.wait_ready(timeout=120)
        list(c.ingest([document(*CANARY)], timeout=30))
        yield c
    cases = sum(v for k, v in COUNTS.items() if not k.startswith("("))
    line = f"fuzz cases: {cases} ({', '.join(f'{k} {v}' for k, v in sorted(COUNTS.items()))})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{line}")
    if LONG and cases:
        record("fuzz", {"cases": cases, "scale": SCALE, "internal_or_unknown": COUNTS["(INTERNAL or UNKNOWN)"],
                        "seconds": round(time.monotonic() - started, 1), **dict(sorted(COUNTS.items()))})  # fmt: skip


def _expect_no_server_fault(kind: str, call: Callable[[], Any]) -> list[Any]:
    """Run one case; any status but INTERNAL/UNKNOWN is fine. Returns the responses received."""
    COUNTS[kind] += 1
    received: list[Any] = []
    try:
        result = call()
        if hasattr(result, "__next__"):  # a response stream: drain it
            received.extend(result)
        else:
            received.append(result)
    except grpc.RpcError as exc:
        if exc.code() in FORBIDDEN:
            COUNTS["(INTERNAL or UNKNOWN)"] += 1
        assert exc.code() not in FORBIDDEN, f"{kind}: {exc.code().name}: {exc.details()}"
    return received


# -- strategies ------------------------------------------------------------------------------------
ODD = ["", " ", "\x00", "\t\n\r", "\u202e\u2066", "\ufeff", "\U0001f99c" * 30, "e\u0301" * 50, "\u0000nul", "'; DROP TABLE documents; --",
       '"""', "<|im_start|>system", "\uffff\U0010ffff", "Ω≈ç√∫", "ﷺ" * 20, "%s%n{0}"]  # fmt: skip
UNICODE = st.characters(exclude_categories=("Cs",))  # surrogates cannot be encoded in a proto string
TEXT = st.one_of(
    st.text(UNICODE, max_size=60),
    st.sampled_from(ODD),
    st.text(st.characters(min_codepoint=0x10000, exclude_categories=("Cs",)), max_size=40),
    st.integers(0, 30_000).map(lambda n: "lorem ipsum " * (n // 12)),
)
HUGE = st.sampled_from([0, 257, 4_001, 20_001, 600_000]).map(lambda n: "x" * n)
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 100, 101, 2**31 - 1, -(2**31)]))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-70_000_000_000, 260_000_000_000))
MAP = st.dictionaries(TEXT, TEXT, max_size=40)


def _timestamp(seconds: int, nanos: int) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=seconds, nanos=nanos)


TIMESTAMP = st.one_of(
    st.none(), st.builds(_timestamp, INT64, INT32), st.builds(_timestamp, st.integers(0, 2**34), st.just(0))
)
WHERE = st.one_of(
    st.none(),
    st.builds(
        lambda eq, any_of, source, lo, hi: pb.Filter(
            equals=eq, any_of={k: pb.StringList(values=v) for k, v in any_of.items()}, source=source,
            valid_from_min=lo, valid_from_max=hi,
        ),
        MAP, st.dictionaries(TEXT, st.lists(TEXT, max_size=1100), max_size=4),
        st.lists(st.one_of(TEXT, st.sampled_from(["*", "[", "[!]", "**/x", "day?"])), max_size=8), TIMESTAMP, TIMESTAMP,
    ),
)  # fmt: skip


NAME = st.from_regex(r"[a-z]{1,8}-[0-9]{1,4}", fullmatch=True)
IDS = st.one_of(NAME, NAME, TEXT, HUGE)


@st.composite
def documents(draw: st.DrawFn) -> pb.Document:
    """Mostly storable documents (so that what they store is exercised later), some broken ones."""
    doc = pb.Document(
        id=draw(IDS), text=draw(st.one_of(TEXT, TEXT, HUGE)), source=draw(TEXT), metadata=draw(MAP),
        supersedes=draw(st.one_of(st.just([]), st.lists(IDS, max_size=40))),
    )  # fmt: skip
    if draw(st.booleans()):
        doc.valid_from.seconds, doc.valid_from.nanos = draw(INT64), draw(INT32)
    return doc


UPSERT = documents().map(lambda d: pb.IngestRequest(upsert=d))
INGEST = st.one_of(
    UPSERT,
    UPSERT,
    UPSERT,  # weighted: most streams should store something
    st.one_of(TEXT, HUGE).map(lambda i: pb.IngestRequest(delete_id=i)),
    st.just(pb.IngestRequest()),
)


@st.composite
def answers(draw: st.DrawFn) -> pb.AnswerRequest:
    req = pb.AnswerRequest(
        question=draw(st.one_of(TEXT, HUGE)), k=draw(INT32), filter=draw(MAP), closed_book=draw(st.booleans()),
        max_tokens=draw(INT32), adapter=draw(st.one_of(TEXT, st.sampled_from(["none", "v0001", "../../etc/passwd", "kfresh-v9"]))),
    )  # fmt: skip
    if draw(st.booleans()):
        req.temperature = draw(st.floats(width=32))
    if draw(st.booleans()):
        req.min_seq = draw(INT64)
    for field, value in (("where", draw(WHERE)), ("as_of", draw(TIMESTAMP)), ("valid_at", draw(TIMESTAMP))):
        if value is not None:
            getattr(req, field).CopyFrom(value)
    return req


# Raw bytes: junk, valid encodings cut or with a flipped bit, and string fields holding invalid UTF-8.
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"ok\xe2\x82"]


def _string_field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


@st.composite
def raw_bytes(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=512))
    encoded = draw(valid).SerializeToString()
    if choice == 1 and encoded:
        return encoded[: draw(st.integers(0, len(encoded) - 1))]
    if choice == 2 and encoded:
        i = draw(st.integers(0, len(encoded) - 1))
        return encoded[:i] + bytes([encoded[i] ^ (1 << draw(st.integers(0, 7)))]) + encoded[i + 1 :]
    return encoded + _string_field(draw(st.integers(1, 15)), draw(st.sampled_from(BAD_UTF8)))


def _raw_unary(channel: grpc.Channel, method: str) -> Callable[[bytes], Any]:
    return channel.unary_unary(
        f"/kfresh.v1.Kfresh/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


@pytest.fixture(scope="module")
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


# -- structured messages ---------------------------------------------------------------------------
def _wait_indexed(client: KfreshClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.stats(timeout=10).pending and time.monotonic() < deadline:
        time.sleep(0.02)


def test_ingest(client: KfreshClient) -> None:
    """Every stored document must stay servable: a search for its text runs right after (and the
    module's later searches keep hitting whatever was stored here)."""

    @FAST
    @given(requests=st.lists(INGEST, min_size=0, max_size=4))
    def case(requests: list[pb.IngestRequest]) -> None:
        acks = _expect_no_server_fault("Ingest", lambda: client._stub.Ingest(iter(requests), timeout=30))
        COUNTS["(stored documents)"] += sum(a.status == pb.ACK_STATUS_STORED for a in acks)
        queries = [r.upsert.text[:200] for r in requests if r.HasField("upsert") and r.upsert.text.strip()]
        if queries:
            _wait_indexed(client)
        for query in queries:
            _expect_no_server_fault(
                "Retrieve",
                lambda query=query: client._stub.Retrieve(pb.RetrieveRequest(query=query, k=100), timeout=30),
            )

    case()


def test_retrieve(client: KfreshClient) -> None:
    @FAST
    @given(query=st.one_of(TEXT, HUGE), k=INT32, filters=MAP, min_seq=st.one_of(st.just(0), INT64), where=WHERE,
           as_of=TIMESTAMP, valid_at=TIMESTAMP)  # fmt: skip
    def case(query: str, k: int, filters: dict[str, str], min_seq: int, where: Any, as_of: Any, valid_at: Any) -> None:
        request = pb.RetrieveRequest(query=query, k=k, filter=filters, min_seq=min_seq, where=where, as_of=as_of,
                                     valid_at=valid_at)  # fmt: skip
        _expect_no_server_fault("Retrieve", lambda: client._stub.Retrieve(request, timeout=30))

    case()


def test_delete_stats_and_adapter_admin(client: KfreshClient) -> None:
    @FAST
    @given(
        doc_id=st.one_of(TEXT, HUGE),
        version=st.one_of(TEXT, st.sampled_from(["v0001", "../v0001", "kfresh-v0001", "v" + "9" * 40])),
    )
    def case(doc_id: str, version: str) -> None:
        _expect_no_server_fault("Delete", lambda: client._stub.Delete(pb.DeleteRequest(id=doc_id), timeout=30))
        _expect_no_server_fault(
            "PromoteAdapter", lambda: client._stub.PromoteAdapter(pb.PromoteAdapterRequest(version=version), timeout=30)
        )
        _expect_no_server_fault("Stats", lambda: client._stub.Stats(pb.StatsRequest(), timeout=30))
        _expect_no_server_fault("ListAdapters", lambda: client._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30))
        _expect_no_server_fault(
            "RollbackAdapter", lambda: client._stub.RollbackAdapter(pb.RollbackAdapterRequest(), timeout=30)
        )

    case()


def test_watch(client: KfreshClient) -> None:
    """A valid Watch runs until the client stops it: each case ends at its deadline (DEADLINE_EXCEEDED is fine)."""

    @examples(40)
    @given(after_seq=st.one_of(st.just(0), INT64), from_now=st.booleans())
    def case(after_seq: int, from_now: bool) -> None:
        request = pb.WatchRequest(after_seq=after_seq, from_now=from_now)
        _expect_no_server_fault("Watch", lambda: client._stub.Watch(request, timeout=0.3))

    case()


def test_answer(client: KfreshClient) -> None:
    @SLOW
    @given(request=answers())
    def case(request: pb.AnswerRequest) -> None:
        _expect_no_server_fault("Answer", lambda: client._stub.Answer(request, timeout=120))

    case()


def test_answer_log_purge_and_review(client: KfreshClient) -> None:
    """The audit, erasure and review RPCs: random ids beside real ones (a logged answer, a stored document)."""
    events = list(client.answer("What do the Ombra canal locks lift?", max_tokens=4, timeout=120))
    logged = events[-1].done.answer_id
    assert logged
    list(client.ingest([document("fuzz-purge-me", "A document the fuzzer may purge.")], timeout=30))
    ids = st.one_of(
        TEXT, HUGE, st.sampled_from([logged, logged.upper(), logged + "x", "fuzz-purge-me", CANARY[0] + "x"])
    )

    @examples(60)
    @given(answer_id=ids, doc_id=ids, state=st.one_of(TEXT, st.sampled_from(["pending", "approved", "rejected", ""])),
           limit=INT32, item=INT64, review_ids=st.lists(INT64, max_size=50),
           decision=st.sampled_from([*pb.DecideReviewRequest.Decision.values(), 7, -1]), note=TEXT)  # fmt: skip
    def case(answer_id: str, doc_id: str, state: str, limit: int, item: int, review_ids: list[int], decision: int,
             note: str) -> None:  # fmt: skip
        stub = client._stub
        _expect_no_server_fault("GetAnswer", lambda: stub.GetAnswer(pb.GetAnswerRequest(id=answer_id), timeout=30))
        _expect_no_server_fault("Purge", lambda: stub.Purge(pb.PurgeRequest(id=doc_id), timeout=30))
        _expect_no_server_fault("ListReview", lambda: stub.ListReview(
            pb.ListReviewRequest(state=state, limit=limit, id=item), timeout=30))  # fmt: skip
        _expect_no_server_fault("DecideReview", lambda: stub.DecideReview(
            pb.DecideReviewRequest(ids=review_ids, decision=decision, reviewer=note, note=note), timeout=30))  # fmt: skip

    case()

    stub_replay = client._stub.ReplayAnswer

    @examples(6)
    @given(answer_id=ids)
    def replay(answer_id: str) -> None:
        _expect_no_server_fault("ReplayAnswer", lambda: stub_replay(pb.ReplayAnswerRequest(id=answer_id), timeout=120))

    replay()


# -- raw bytes ---------------------------------------------------------------------------------------
UNARY = {
    "Retrieve": st.builds(pb.RetrieveRequest, query=TEXT, k=INT32, filter=MAP),
    "Delete": st.builds(pb.DeleteRequest, id=TEXT),
    "Stats": st.just(pb.StatsRequest()),
    "WaitSearchable": st.builds(
        pb.WaitSearchableRequest,
        timeout_s=st.one_of(
            st.floats(min_value=-1e6, max_value=1e6), st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0])
        ),
    ),
    "ListAdapters": st.just(pb.ListAdaptersRequest()),
    "PromoteAdapter": st.builds(pb.PromoteAdapterRequest, version=TEXT),
    "RollbackAdapter": st.just(pb.RollbackAdapterRequest()),
    "Purge": st.builds(pb.PurgeRequest, id=TEXT),
    "GetAnswer": st.builds(pb.GetAnswerRequest, id=TEXT),
    "ListReview": st.builds(pb.ListReviewRequest, state=TEXT, limit=INT32, id=INT64),
    "DecideReview": st.builds(
        pb.DecideReviewRequest, ids=st.lists(INT64, max_size=20), decision=st.integers(-3, 9), reviewer=TEXT, note=TEXT
    ),
}


@pytest.mark.parametrize("method", sorted(UNARY))
def test_raw_bytes_to_unary_rpcs(channel: grpc.Channel, method: str) -> None:
    call = _raw_unary(channel, method)

    @examples(60)
    @given(raw=raw_bytes(UNARY[method]))
    def case(raw: bytes) -> None:
        _expect_no_server_fault(f"raw {method}", lambda: call(raw, timeout=30))

    case()


def test_raw_bytes_to_ingest_stream(channel: grpc.Channel) -> None:
    call = channel.stream_stream(
        "/kfresh.v1.Kfresh/Ingest", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )

    @FAST
    @given(messages=st.lists(raw_bytes(INGEST), min_size=1, max_size=3))
    def case(messages: list[bytes]) -> None:
        _expect_no_server_fault("raw Ingest", lambda: call(iter(messages), timeout=30))

    case()


def test_raw_bytes_to_answer(channel: grpc.Channel) -> None:
    call = channel.unary_stream(
        "/kfresh.v1.Kfresh/Answer", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )

    @examples(40)
    @given(raw=raw_bytes(answers()))
    def case(raw: bytes) -> None:
        _expect_no_server_fault("raw Answer", lambda: call(raw, timeout=120))

    case()


def test_raw_bytes_to_watch(channel: grpc.Channel) -> None:
    call = channel.unary_stream(
        "/kfresh.v1.Kfresh/Watch", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )

    @examples(40)
    @given(raw=raw_bytes(st.builds(pb.WatchRequest, after_seq=INT64, from_now=st.booleans())))
    def case(raw: bytes) -> None:
        _expect_no_server_fault("raw Watch", lambda: call(raw, timeout=0.3))

    case()


def test_raw_bytes_to_distill_and_probes(channel: grpc.Channel) -> None:
    """Distill only gets bytes that cannot decode (a decodable one would start a real training run)."""
    distill = _raw_unary(channel, "Distill")
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )

    def undecodable(raw: bytes) -> bool:
        try:
            pb.DistillRequest.FromString(raw)
        except Exception:
            return True
        return False

    @examples(60)
    @given(raw=st.one_of(st.binary(max_size=256), st.sampled_from(BAD_UTF8)))
    def case(raw: bytes) -> None:
        if undecodable(raw):
            _expect_no_server_fault("raw Distill", lambda: distill(raw, timeout=30))
        _expect_no_server_fault("raw Health", lambda: check(raw, timeout=30))

    case()


def test_undecodable_requests_are_invalid_argument(channel: grpc.Channel) -> None:
    bad = _string_field(1, b"\xff\xfe")
    with pytest.raises(grpc.RpcError) as err:
        _raw_unary(channel, "Retrieve")(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid kfresh.v1.RetrieveRequest message" in err.value.details()
    ingest = channel.stream_stream(
        "/kfresh.v1.Kfresh/Ingest", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    good = pb.IngestRequest(
        upsert=pb.Document(id="fuzz-ok", text="A fine document before a broken one.")
    ).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        list(ingest(iter([good, b"\x0a\x05\x0a"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "message #2" in err.value.details()


def test_out_of_range_valid_from_is_rejected_not_stored(client: KfreshClient) -> None:
    doc = pb.Document(id="fuzz-far-future", text="A date no timestamp can hold.")
    doc.valid_from.seconds = 2**62
    with pytest.raises(grpc.RpcError) as err:
        list(client.ingest([doc], timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "valid_from" in err.value.details()


def test_every_rpc_of_the_service_was_fuzzed(client: KfreshClient) -> None:
    """A new RPC without a fuzz case fails here (Distill only gets undecodable bytes: a valid one trains)."""
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Kfresh"].methods}
    fuzzed = {kind.removeprefix("raw ") for kind, n in COUNTS.items() if n and not kind.startswith("(")}
    assert methods - fuzzed == set(), f"RPCs no case reached: {sorted(methods - fuzzed)}"


def test_server_is_healthy_after_fuzzing(client: KfreshClient) -> None:
    assert client.health(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    assert client.health("") == health_pb2.HealthCheckResponse.SERVING
    assert client.stats(timeout=10).documents >= 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(c.doc_id == CANARY[0] for c in client.retrieve("Ombra canal lock barges", k=10, timeout=10).chunks):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the document acknowledged before fuzzing is not retrievable")
    events = list(client.answer("Say hi.", closed_book=True, max_tokens=4, timeout=60))
    assert events[-1].HasField("done")
