"""Purge (issue 19, item 4): `kfresh delete ID --purge` erases a document from the store (every version), the
index and its snapshot, and the answer log, while a plain delete keeps the last text as a tombstone.
Real server, real vLLM model, the bytes of the real SQLite files and snapshot checked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from server_helper import ServerHandle, store_bytes, token_server
from server_helper import answer_once as _answer
from server_helper import status_of as _code

from kfresh.client import KfreshClient, document
from kfresh.indexer.snapshot import read_snapshot, snapshot_path

pytestmark = pytest.mark.slow
ADMIN = "purge-admin-token-4c9e1b7a2f30"
WRITER = "purge-writer-token-8a0d3e6c5b19"
ACME_ADMIN = "purge-acme-admin-token-1f6b9d2e7c40"
BETA_ADMIN = "purge-beta-admin-token-5e2a8c0f3d61"
SECRETS = (b"Quorvantis", b"Ashgrove", b"Tilbury")


@pytest.fixture(scope="module")
def server(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = token_server(
        engine_loop,
        vllm_backend,
        tmp_path_factory.mktemp("purge"),
        f"{ADMIN} admin\n{WRITER} write\n{ACME_ADMIN} admin tenant=acme\n{BETA_ADMIN} admin tenant=beta\n",
    )
    yield handle
    handle.stop()


def _client(server: ServerHandle, token: str = ADMIN) -> KfreshClient:
    return KfreshClient(f"127.0.0.1:{server.port}", token=token)


def test_purge_erases_every_version_and_the_answers_that_showed_it(server: ServerHandle) -> None:
    with _client(server) as admin, _client(server, WRITER) as writer:
        admin.wait_ready(timeout=120)
        first = "Quorvantis Blemwright, the harbour pilot, lives at 14 Ashgrove Lane in Port Selby."
        moved = "Quorvantis Blemwright, the harbour pilot, moved to 9 Tilbury Row in Port Selby."
        keep = "The Port Selby ferry leaves the north pier every hour from 06:00 to 22:00."
        list(writer.ingest([document("pilot", first), document("ferry", keep)], timeout=30))
        list(writer.ingest([document("pilot", moved)], timeout=30))
        assert writer.wait_searchable(30).searchable
        _, about_pilot = _answer(admin, "Where does the harbour pilot of Port Selby live?")
        _, about_ferry = _answer(admin, "When does the ferry leave the north pier?")
        assert [c.doc_id for c in about_pilot.citations] == ["pilot"]
        assert [c.doc_id for c in about_ferry.citations] == ["ferry"]
        admin.get_answer(about_pilot.answer_id)  # logged (the write in flight is waited for)

        writer.delete("pilot")
        assert b"Tilbury" in store_bytes(server)  # a plain delete keeps the last text (a tombstone)
        assert _code(lambda: writer.purge("pilot")) == grpc.StatusCode.PERMISSION_DENIED  # purge takes admin

        reply = admin.purge("pilot")
        assert (reply.version, reply.seq) == (0, 0)  # already deleted: nothing new in the change log
        assert reply.answers >= 1 and reply.snapshot_written
        stored = store_bytes(server)
        assert not [s for s in SECRETS if s in stored], "purged text is still in the store files"
        assert _code(lambda: admin.get_answer(about_pilot.answer_id)) == grpc.StatusCode.NOT_FOUND
        assert admin.get_answer(about_ferry.answer_id).citations[0].doc_id == "ferry"  # others stay
        assert _code(lambda: admin.purge("never-was")) == grpc.StatusCode.NOT_FOUND


def test_purge_of_a_live_document_deletes_it_and_rewrites_the_snapshot(server: ServerHandle) -> None:
    with _client(server) as admin:
        admin.wait_ready(timeout=120)
        text = "Quorvantis Blemwright's sister keeps bees at the Ashgrove allotments."
        (ack,) = list(admin.ingest([document("sister", text)], timeout=30))
        assert admin.wait_searchable(30).searchable
        assert any(c.doc_id == "sister" for c in admin.retrieve("beekeeper at the allotments", k=5).chunks)
        reply = admin.purge("sister")
        assert reply.version == ack.version + 1 and reply.seq > ack.seq and reply.chunks >= 1
        assert reply.snapshot_written
        assert all(c.doc_id != "sister" for c in admin.retrieve("beekeeper at the allotments", k=5).chunks)
        header, _, map_bytes = read_snapshot(snapshot_path(server.runtime.cfg.index.snapshot_dir))
        assert header["applied_seq"] >= reply.seq and b"sister" not in bytes(map_bytes)
        time.sleep(0.1)
        stored = store_bytes(server)
        assert not [s for s in SECRETS if s in stored]
        assert admin.stats().deleted >= 1


def test_a_tenant_admin_purges_its_own_deleted_document_and_never_another_tenants(server: ServerHandle) -> None:
    with _client(server, ACME_ADMIN) as acme, _client(server, BETA_ADMIN) as beta:
        acme.wait_ready(timeout=120)
        list(acme.ingest([document("acme-secret", "Acme's vault code is kept by Ysolde Marrowick.")], timeout=30))
        acme.delete("acme-secret")  # deleted: no live document says whose it was, the tombstone does
        assert b"Marrowick" in store_bytes(server)
        assert _code(lambda: beta.purge("acme-secret")) == grpc.StatusCode.NOT_FOUND  # another tenant's: absent
        assert b"Marrowick" in store_bytes(server)
        assert acme.purge("acme-secret").versions == 1
        assert b"Marrowick" not in store_bytes(server)
        assert _code(lambda: acme.purge("acme-secret")) == grpc.StatusCode.NOT_FOUND  # nothing left to say whose
