"""The answer log (issue 19, item 3): every answer gets an id; GetAnswer explains it, ReplayAnswer asks it again
with the same passages and adapter, after later corrections too. Real server, real vLLM model, real stores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_helper import ServerHandle, store_bytes, token_server
from server_helper import answer_once as _answer
from server_helper import status_of as _code

from kfresh.client import KfreshClient, document
from kfresh.indexer.rows import LoggedAnswerRow
from kfresh.indexer.stores.postgres import PostgresStore
from kfresh.indexer.stores.sqlite import SqliteStore
from kfresh.prompt import NOT_FOUND_REPLY

ADMIN = "admin-token-9f2c41d7e0b3a8c6"
ACME = "acme-admin-token-57e1c0a9b2d4"
GLOBEX = "globex-admin-token-c3a8e6f1b907"
READER = "reader-token-0d9e7a2f6c15b4"
T0 = 1_790_000_000.0


def _stores(tmp: Path, pg_dsn: str) -> list[Any]:
    return [SqliteStore(tmp / "k.db"), PostgresStore(pg_dsn)]


def test_store_logs_reads_and_prunes_answers(tmp_path: Path, pg_dsn: str) -> None:
    for store in _stores(tmp_path, pg_dsn):
        with store:
            store.record_answer(LoggedAnswerRow("answer-old", 1000.0, "old?", {"answer": "x"}), [("d1", 1)])
            store.record_answer(LoggedAnswerRow("answer-new", 5000.0, "new?", {"answer": "ü"}), [("d1", 2), ("d2", 1)])
            store.record_answer(LoggedAnswerRow("answer-rep", 5001.0, "new?", {}, "answer-new"), [("d1", 2)])
            store.record_answer(LoggedAnswerRow("answer-sup", 5002.0, "sup?", {}), [("d2", 1)], [("d1", 2)])
            store.record_answer(LoggedAnswerRow("answer-2nd", 5003.0, "new?", {}), [("d1", 2)])
            row = store.logged_answer("answer-new")
            assert row is not None and (row.at, row.question, row.body) == (5000.0, "new?", {"answer": "ü"})
            assert store.logged_answer("answer-rep").replay_of == "answer-new"  # type: ignore[union-attr]
            assert store.logged_answer("answer-none") is None
            # real traffic per version: shown (not superseded), no replays, each question once
            assert store.logged_questions([("d1", 2), ("d2", 1), ("d1", 9)]) == {
                ("d1", 2): ["new?"], ("d2", 1): ["new?", "sup?"]
            }  # fmt: skip
            assert store.prune_answers(1000.0) == 0  # strictly older only
            assert store.prune_answers(4000.0) == 1
            assert store.logged_answer("answer-old") is None and store.logged_answer("answer-new") is not None
            assert store.logged_questions([("d1", 1)]) == {}


@pytest.fixture(scope="module")
def server(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    tokens = f"{ADMIN} admin\n{ACME} admin tenant=acme\n{GLOBEX} admin tenant=globex\n{READER} read\n"
    handle = token_server(engine_loop, vllm_backend, tmp_path_factory.mktemp("answer_log"), tokens)
    yield handle
    handle.stop()


def _client(server: ServerHandle, token: str = ADMIN) -> KfreshClient:
    return KfreshClient(f"127.0.0.1:{server.port}", token=token)


def _replay(client: KfreshClient, answer_id: str) -> tuple[str, Any]:
    text, done = [], None
    for event in client.replay_answer(answer_id, timeout=120):
        if event.HasField("done"):
            done = event.done
        else:
            text.append(event.delta)
    assert done is not None
    return "".join(text), done


@pytest.mark.slow
def test_explain_and_replay_after_a_correction(server: ServerHandle) -> None:
    with _client(server) as client:
        client.wait_ready(timeout=120)
        first = "The Harwick lighthouse keeper is Mirela Dask, appointed by the harbour board."
        list(client.ingest([document("keeper", first, source="harbour/news", valid_from=T0)], timeout=30))
        assert client.wait_searchable(30).searchable
        text, done = _answer(client, "Who is the Harwick lighthouse keeper?")
        assert done.answer_id.startswith("answer-") and "Mirela" in text

        logged = client.get_answer(done.answer_id)  # at once: a write in flight is waited for
        assert logged.question == "Who is the Harwick lighthouse keeper?" and logged.answer == text
        assert [(c.doc_id, c.version, c.text) for c in logged.citations] == [("keeper", 1, first)]
        assert logged.citations[0].primary and logged.adapter == done.adapter and logged.model == done.model
        assert logged.finish_reason == done.finish_reason and logged.timings.total_ms > 0 and not logged.replay_of

        fixed = "The Harwick lighthouse keeper is Tomas Reyl since the harbour board's vote in June."
        list(client.ingest([document("keeper", fixed, source="harbour/news", valid_from=T0 + 86_400)], timeout=30))
        assert client.wait_searchable(30).searchable
        now_text, now_done = _answer(client, "Who is the Harwick lighthouse keeper?")
        assert [(c.doc_id, c.version) for c in now_done.citations] == [("keeper", 2)] and "Tomas" in now_text

        replayed, replay_done = _replay(client, done.answer_id)  # the passages as they were shown, not as now
        assert [(c.doc_id, c.version, c.text) for c in replay_done.citations] == [("keeper", 1, first)]
        assert replayed == text  # greedy, same passages, same adapter: the same answer
        again = client.get_answer(replay_done.answer_id)
        assert again.replay_of == done.answer_id and again.answer == replayed


@pytest.mark.slow
def test_refusals_are_logged_and_errors_are_clear(server: ServerHandle) -> None:
    with _client(server) as client:
        client.wait_ready(timeout=120)
        text, done = _answer(client, "Who keeps the lighthouse?", filter={"topic": "nothing-has-this"})
        assert done.finish_reason == "not_found"
        logged = client.get_answer(done.answer_id)
        assert logged.answer == NOT_FOUND_REPLY == text and not logged.citations and logged.finish_reason == "not_found"
        replayed, _ = _replay(client, done.answer_id)
        assert replayed == NOT_FOUND_REPLY
        assert _code(lambda: client.get_answer("answer-" + "0" * 32)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: client.get_answer("")) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: list(client.replay_answer("answer-nope"))) == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_tokens_are_never_logged_and_tenants_see_only_theirs(server: ServerHandle) -> None:
    with _client(server, ACME) as acme, _client(server, GLOBEX) as globex:
        acme.wait_ready(timeout=120)
        list(acme.ingest([document("acme-hours", "Acme's shop opens at 08:30 on weekdays.")], timeout=30))
        assert acme.wait_searchable(30).searchable
        _, done = _answer(acme, "When does Acme's shop open?")
        logged = acme.get_answer(done.answer_id)
        assert dict(logged.tenant) == {"tenant": "acme"} and '"tenant": "acme"' in logged.filter_json
        assert _code(lambda: globex.get_answer(done.answer_id)) == grpc.StatusCode.NOT_FOUND
        with _client(server) as admin, _client(server, READER) as reader:
            assert admin.get_answer(done.answer_id).id == done.answer_id  # an unbound admin sees every answer
            # the log holds every user's questions: reading it takes the admin scope
            assert _code(lambda: reader.get_answer(done.answer_id)) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: list(reader.replay_answer(done.answer_id))) == grpc.StatusCode.PERMISSION_DENIED
    time.sleep(0.2)
    stored = store_bytes(server)
    assert b"When does Acme" in stored  # the log is in this file ...
    for token in (ADMIN, ACME, GLOBEX, READER):
        assert token.encode() not in stored  # ... and no token is
