"""Tenants that cannot see each other: tokens bound to tenant=..., over real gRPC, the real indexer and embedder.

A property test (hypothesis) drives the same binding rules against a real Indexer: no reply ever holds
another tenant's chunk, and every reply is the exact filtered top k.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from indexer_helper import doc_text
from server_helper import ServerHandle, server_config
from server_helper import status_of as _code
from test_security import CannedBackend

from kfresh.client import KfreshClient, document, where
from kfresh.core.config import ConfigError, KfreshConfig
from kfresh.core.errors import Forbidden
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.filters import Filter
from kfresh.indexer.service import Indexer
from kfresh.server.auth import TokenTable, parse_grants
from kfresh.server.tenancy import bind_document, bind_filters, owns
from kfresh.v1 import kfresh_pb2 as pb

ACME = "acme-5d1c0f7e9b2a4c68a1f3"
GLOBEX = "globex-8e2b6a9d3c7f4e10b5"
ADMIN = "admin-1f4e7b2c9a6d3e58c0a7"


def test_token_lines_carry_a_binding_and_bad_ones_name_the_line() -> None:
    grants = parse_grants([f"{ACME} read,write tenant=acme region=eu", f"{ADMIN} admin"], "f")
    assert grants == [(ACME, ["read", "write"], {"tenant": "acme", "region": "eu"}), (ADMIN, ["admin"], {})]
    table = TokenTable(grants)
    assert table.binding([("authorization", f"Bearer {ACME}")]) == {"tenant": "acme", "region": "eu"}
    assert table.binding([("authorization", f"Bearer {ADMIN}")]) == {} and table.binding(None) == {}
    for bad in (f"{ACME} read tenant", f"{ACME} read =acme", f"{ACME} read tenant=a tenant=b"):
        with pytest.raises(ConfigError, match="f line 1: a tenant binding is KEY=VALUE"):
            parse_grants([bad], "f")


def test_binding_rules() -> None:
    assert bind_filters({"lang": "en"}, {"tenant": "acme"}).equals == {"lang": "en", "tenant": "acme"}
    assert bind_filters({"tenant": "acme"}, {"tenant": "acme"}).equals == {"tenant": "acme"}
    with pytest.raises(Forbidden, match="bound to tenant=acme"):
        bind_filters({"tenant": "globex"}, {"tenant": "acme"})
    with pytest.raises(Forbidden, match=r"tenant in \['globex'\]"):  # an IN list cannot widen it either
        bind_filters(Filter(any_of={"tenant": frozenset({"acme", "globex"})}), {"tenant": "acme"})
    narrowed = bind_filters(Filter(any_of={"tenant": frozenset({"acme"})}, sources=("faq/*",)), {"tenant": "acme"})
    assert narrowed.equals == {"tenant": "acme"} and narrowed.sources == ("faq/*",)
    doc = bind_document(DocumentIn("a", "x", metadata={"lang": "en"}), {"tenant": "acme"})
    assert doc.metadata == {"lang": "en", "tenant": "acme"}
    with pytest.raises(Forbidden, match="document 'a'"):
        bind_document(DocumentIn("a", "x", metadata={"tenant": "globex"}), {"tenant": "acme"})
    assert owns(None, {"tenant": "acme"}) and owns({"tenant": "acme"}, {"tenant": "acme"})
    assert not owns({}, {"tenant": "acme"}) and not owns({"tenant": "globex"}, {"tenant": "acme"})


@pytest.fixture(scope="module")
def tenant_server(engine_loop: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    tmp = tmp_path_factory.mktemp("tenants")
    tokens = tmp / "tokens"
    tokens.write_text(f"{ACME} read,write tenant=acme\n{GLOBEX} read,write tenant=globex\n{ADMIN} admin\n")
    handle = ServerHandle(engine_loop, server_config(tmp, server__auth_tokens_file=tokens), CannedBackend())
    yield handle
    handle.stop()


def _client(server: ServerHandle, token: str) -> KfreshClient:
    return KfreshClient(f"127.0.0.1:{server.port}", token=token)


def test_tenants_see_write_and_delete_only_their_own(tenant_server: ServerHandle) -> None:
    with (
        _client(tenant_server, ACME) as acme,
        _client(tenant_server, GLOBEX) as globex,
        _client(tenant_server, ADMIN) as admin,
    ):
        list(acme.ingest([document("t-acme", "The Varn lighthouse keeper is Ilse Maro.", metadata={"lang": "en"})]))
        list(globex.ingest([document("t-globex", "The Varn lighthouse keeper is Tomas Ek.")]))
        assert acme.wait_searchable(30).searchable
        # stamped on ingest
        mine = acme.retrieve("Who keeps the Varn lighthouse?", k=5)
        assert [(c.doc_id, dict(c.metadata)) for c in mine.chunks] == [("t-acme", {"lang": "en", "tenant": "acme"})]
        assert mine.all_matches  # one chunk of five asked: every match
        assert [c.doc_id for c in globex.retrieve("Who keeps the Varn lighthouse?", k=5).chunks] == ["t-globex"]
        # a request can narrow its view, never widen it
        assert acme.retrieve("lighthouse", filter={"lang": "de"}).chunks == []
        assert (
            _code(lambda: acme.retrieve("lighthouse", filter={"tenant": "globex"})) == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            _code(lambda: acme.answer("Who keeps it?", filter={"tenant": "globex"}))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        done = next(r.done for r in acme.answer("Who keeps the Varn lighthouse?", k=5) if r.HasField("done"))
        assert [c.doc_id for c in done.citations] == ["t-acme"]
        # another tenant's document: not deletable (as if absent), not overwritable, not taggable
        assert _code(lambda: globex.delete("t-acme")) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: globex.ingest([document("t-acme", "Hijacked.")])) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: globex.ingest([pb.IngestRequest(delete_id="t-acme")])) == grpc.StatusCode.PERMISSION_DENIED
        tagged = document("t-other", "x", metadata={"tenant": "acme"})
        assert _code(lambda: globex.ingest([tagged])) == grpc.StatusCode.PERMISSION_DENIED
        # the messages before a refused one are acknowledged, as for invalid input
        acks: list[pb.IngestResponse] = []
        with pytest.raises(grpc.RpcError) as err:
            for ack in globex.ingest([document("t-globex-2", "Second."), document("t-acme", "Hijacked.")]):
                acks.append(ack)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "message #2" in (err.value.details() or "")
        assert [a.id for a in acks] == ["t-globex-2"]
        # the owner still has it, unchanged; an unbound admin token sees every tenant
        assert [c.text for c in acme.retrieve("lighthouse keeper", k=1).chunks] == [
            "The Varn lighthouse keeper is Ilse Maro."
        ]
        assert {c.doc_id for c in admin.retrieve("Varn lighthouse keeper", k=10).chunks} >= {"t-acme", "t-globex"}
        # Stats: a bound token also sees its tenant's share of the index; an unbound one has no tenant part
        mine = globex.stats().tenant
        assert dict(mine.binding) == {"tenant": "globex"}
        assert mine.documents == mine.chunks == len(globex.retrieve("lighthouse", k=50).chunks) >= 2
        assert not admin.stats().HasField("tenant")
        assert acme.delete("t-acme").id == "t-acme"


def test_where_over_grpc_and_the_cli(
    tenant_server: ServerHandle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """IN lists, source globs and a valid_from range through the proto, the client helper and `kfresh retrieve`."""
    from kfresh.cli import main

    with _client(tenant_server, GLOBEX) as globex:
        docs = [document(f"w{i}", f"Ferry timetable {i}: the boat leaves pier {i} at dawn.", source=f"{kind}/{i}",
                         metadata={"line": line}, valid_from=1_700_000_000.0 + 86_400 * i)
                for i, (kind, line) in enumerate([("faq", "north"), ("news", "north"), ("faq", "south"), ("faq", "east")])]  # fmt: skip
        list(globex.ingest(docs))
        assert globex.wait_searchable(30).searchable
        ask = "When does the ferry leave the pier?"
        reply = globex.retrieve(ask, k=10, where=where(any_of={"line": ["north", "south"]}, source=["faq/*"]))
        assert sorted(c.doc_id for c in reply.chunks) == ["w0", "w2"] and reply.all_matches
        late = globex.retrieve(
            ask,
            k=10,
            where=where(valid_from_min=1_700_000_000.0 + 86_400 * 2, valid_from_max=1_700_000_000.0 + 86_400 * 10),
        )
        assert sorted(c.doc_id for c in late.chunks) == ["w2", "w3"]
        for bad, needle in ((where(any_of={"line": []}), "any_of['line'] is empty"),
                            (where(valid_from_min=5.0, valid_from_max=1.0), "valid_from_min must be before")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                globex.retrieve(ask, where=bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in (err.value.details() or "")
    capsys.readouterr()
    monkeypatch.setenv("KFRESH_CLIENT__TOKEN", GLOBEX)
    code = main(["retrieve", ask, "--addr", f"127.0.0.1:{tenant_server.port}", "--in", "line=north,east",
                 "--source", "faq/*", "--since", "2023-11-14", "--json"])  # fmt: skip
    assert code == 0 or code is None
    out = capsys.readouterr().out
    assert '"w0"' in out and '"w3"' in out and '"w1"' not in out and '"w2"' not in out


# -- the property: a real Indexer, random tenants, filters and bindings ---------------------------------------------

N = 120
TENANTS = ("acme", "globex", "initech")
COLORS = ("red", "green", "blue", "gold")
QUERIES = ("lighthouse keeper ships", "reef at dawn", "Record 42", "logged ships passing")


def _meta(i: int) -> dict[str, str]:
    rng = np.random.default_rng(i)
    return {"tenant": TENANTS[int(rng.integers(3))], "color": COLORS[int(rng.integers(4))]}


@pytest.fixture(scope="module")
def shared_index(embedder_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Indexer, Any]]:
    embedder = SentenceTransformerEmbedder(embedder_path, device="cpu")
    ix = Indexer(KfreshConfig().with_home(tmp_path_factory.mktemp("tenant-index")), embedder=embedder)
    ix.start()
    acks = [ix.upsert(DocumentIn(f"d{i}", doc_text(i), metadata=_meta(i))) for i in range(N)]
    assert all(ix.wait_until_indexed(a.id, a.version, 120) for a in acks)
    vectors = embedder.encode([doc_text(i) for i in range(N)])
    yield ix, {q: vectors @ embedder.encode([q])[0] for q in QUERIES}
    ix.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tenant=st.sampled_from(TENANTS),
    asked=st.fixed_dictionaries({}, optional={"tenant": st.sampled_from(TENANTS), "color": st.sampled_from(COLORS)}),
    query=st.sampled_from(QUERIES),
    k=st.integers(1, 30),
)
def test_no_reply_crosses_a_tenant_and_every_reply_is_the_exact_filtered_top_k(
    shared_index: tuple[Indexer, Any], tenant: str, asked: dict[str, str], query: str, k: int
) -> None:
    ix, scores = shared_index
    binding = {"tenant": tenant}
    if asked.get("tenant", tenant) != tenant:
        with pytest.raises(Forbidden):
            bind_filters(asked, binding)
        return
    filters = bind_filters(asked, binding)
    hits = ix.search(query, k, filters)
    assert all(h.metadata["tenant"] == tenant for h in hits)
    ranked = [f"d{i}" for i in np.argsort(-scores[query], kind="stable")]
    want = [d for d in ranked if all(_meta(int(d[1:]))[a] == b for a, b in filters.equals.items())][:k]
    assert [h.doc_id for h in hits] == want


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_the_store_checks_ownership_inside_the_write_transaction(kind: str, tmp_path: Any, request: Any) -> None:
    """Two tenants racing for one new id: whoever commits first holds it, the other's write is refused there,
    in the same transaction (no check-then-write gap); the ops before it commit, the ones after it do not."""
    from kfresh.indexer.documents import WriteOp
    from kfresh.indexer.stores.postgres import PostgresStore
    from kfresh.indexer.stores.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "k.db") if kind == "sqlite" else PostgresStore(request.getfixturevalue("pg_dsn"))
    run = f"{kind}-{np.random.default_rng().integers(1 << 30)}"
    acme, beta = {"tenant": "acme"}, {"tenant": "beta"}

    def op(doc_id: str, owner: dict[str, str], text: str = "text") -> WriteOp:
        return WriteOp(doc_id, DocumentIn(doc_id, text, metadata=dict(owner)), (text,), owner=owner)

    with store:
        (first,) = store.write_many([op(f"faq-{run}", acme, "Acme's answer.")])  # acme committed first
        acks = store.write_many(
            [op(f"own-{run}", beta), op(f"faq-{run}", beta, "Beta's answer."), op(f"after-{run}", beta)]
        )
        assert [a.status for a in acks] == ["stored", "forbidden"]  # nothing after the refused op
        assert store.live_metadata([f"faq-{run}", f"own-{run}", f"after-{run}"]) == {
            f"faq-{run}": acme,
            f"own-{run}": beta,
        }
        assert store.current(f"faq-{run}").version == first.version  # acme's document is untouched
        (gone,) = store.write_many([WriteOp(f"faq-{run}", owner=beta)])  # nor can beta delete it
        assert gone.status == "forbidden" and not store.current(f"faq-{run}").deleted
        assert store.write_many([WriteOp(f"faq-{run}", owner=acme)])[0].status == "deleted"
        assert store.write_many([op(f"faq-{run}", beta, "Beta's now.")])[0].status == "stored"  # a deleted id is free
