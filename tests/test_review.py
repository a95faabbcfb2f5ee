"""The review queue (finetune.require_review): what distillation would learn waits for a person; only approved items
train; every decision is recorded with who and when. Real SQLite, a real gRPC server with auth, the real model for
the closed-book check of the queued candidates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from kfresh.core.config import KfreshConfig
from kfresh.core.errors import InvalidInput, NotFound
from kfresh.finetuner.facts import Fact
from kfresh.finetuner.pairs import pair_fact
from kfresh.finetuner.review import QUEUE_FILE, ReviewQueue, item_key

SENTENCE = "The Saltmarsh ferry departs from Pier 12."


def _pair(span: str, doc_id: str = "ferry") -> Fact:
    return pair_fact(question=SENTENCE.replace(span, "where").rstrip(".") + "?", answer=SENTENCE, span=span,
                     kind="name", sentence=SENTENCE, doc_id=doc_id, version=1, date="2026-01-01T00:00:00Z")  # fmt: skip


def _template(doc_id: str) -> Fact:
    return Fact("the Orvik Tower", "height", "212 metres", "2026-01-01T00:00:00Z", doc_id, 1,
                "The Orvik Tower is 212 metres tall.")  # fmt: skip


def test_queue_orders_by_what_helps_most_and_records_every_decision(tmp_path):
    with ReviewQueue(tmp_path / QUEUE_FILE) as queue:
        known, wrong, cited = _template("tower"), _pair("Pier 12"), _pair("Saltmarsh", doc_id="ferry-2")
        added = queue.offer([known, wrong, cited], base_wrong=[item_key(wrong)], cited={("ferry-2", 1): 7})
        assert added == 3 and queue.offer([known, wrong]) == 0  # offering again changes nothing
        order = [i.fact for i in queue.items()]
        assert order == [wrong, cited, known]  # wrong closed-book first, then the most cited
        assert queue.counts() == {"pending": 3, "approved": 0, "rejected": 0}
        ids = {i.fact: i.id for i in queue.items()}

        decided = queue.decide([ids[wrong], ids[known]], "approved", by="ana", note="checked the source")
        assert [d.state for d in decided] == ["approved", "approved"] and decided[0].decided_by == "ana"
        queue.decide([ids[known]], "rejected", by="ben", note="the tower was rebuilt")
        assert queue.approved([known, wrong, cited]) == [wrong]  # only approved items train
        assert [(s, by) for s, by, _, _ in queue.history(ids[known])] == [("approved", "ana"), ("rejected", "ben")]
        assert [i.fact for i in queue.items(state="pending")] == [cited]

        with pytest.raises(NotFound, match="999"):
            queue.decide([ids[cited], 999], "approved", by="ana")
        assert queue.get(ids[cited]).state == "pending"  # all or none
        with pytest.raises(InvalidInput):
            queue.decide([ids[cited]], "maybe", by="ana")  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="reviewer"):
            queue.decide([ids[cited]], "approved", by=" ")
        with pytest.raises(InvalidInput, match="state"):
            queue.items(state="done")


def test_review_over_grpc_needs_admin_and_records_the_reviewer(engine_loop, tmp_path, capsys, monkeypatch):
    """ListReview / DecideReview on a real server with bearer tokens; `kfresh review` over it."""
    from server_helper import ServerHandle, server_config

    from kfresh.cli import main
    from kfresh.client import KfreshClient

    tokens = tmp_path / "tokens"
    tokens.write_text("admin-token-0123456789 admin\nreader-token-0123456789 read\n")
    cfg = server_config(tmp_path / "home", generation__backend="remote", generation__remote_url="http://127.0.0.1:9",
                        server__auth_tokens_file=tokens, finetune__require_review=True)  # fmt: skip
    with ReviewQueue(Path(cfg.finetune.work_dir) / QUEUE_FILE) as queue:  # as a distillation run would queue them
        queue.offer([_pair("Pier 12"), _template("tower")], base_wrong=[item_key(_pair("Pier 12"))])
    handle = ServerHandle(engine_loop, cfg, None)
    addr = f"127.0.0.1:{handle.port}"
    try:
        with KfreshClient(addr, token="reader-token-0123456789") as reader:
            with pytest.raises(grpc.RpcError) as err:
                reader.list_review()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with KfreshClient(addr, token="admin-token-0123456789") as admin:
            listing = admin.list_review()
            assert listing.required and dict(listing.counts) == {"pending": 2, "approved": 0, "rejected": 0}
            first = listing.items[0]
            assert (first.kind, first.span, first.base_wrong, first.answer) == ("name", "Pier 12", True, SENTENCE)
            assert listing.items[1].kind == "template" and listing.items[1].question == "the Orvik Tower | height"
            reply = admin.decide_review([first.id], approve=True, reviewer="ana", note="matches the timetable")
            assert reply.items[0].state == "approved" and reply.items[0].decided_by.startswith("ana (token ")
            with pytest.raises(grpc.RpcError) as err:
                admin.decide_review([first.id, 424242], approve=False, reviewer="ana")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "424242" in err.value.details()
            again = admin.decide_review([first.id], approve=False, reviewer="")
            assert again.items[0].state == "rejected" and again.items[0].decided_by.startswith("anonymous (token ")
        capsys.readouterr()
        assert main(["review", "list", "--addr", addr]) == 1  # no token in this process's client settings
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("KFRESH_CLIENT__TOKEN", "admin-token-0123456789")
        assert main(["review", "list", "--addr", addr]) == 0
        out = capsys.readouterr().out
        assert (
            "[rejected] ferry v1 (name)" in out
            and "by anonymous" in out
            and "1 pending, 1 rejected" in out.replace("0 approved, ", "")
        )
    finally:
        handle.stop()


@pytest.mark.slow
def test_only_approved_candidates_train(tmp_path, models_config):
    """run_distill with require_review: a dry run queues the candidates (checked closed-book by the real model),
    and the next run plans only what was approved."""
    from kfresh.finetuner.distill import run_distill
    from kfresh.indexer.documents import DocumentIn
    from kfresh.indexer.stores import open_store

    data = KfreshConfig().with_home(tmp_path).model_dump()
    data["models"] = models_config.model_dump()
    data["finetune"].update(stable_for_s=0.0, device="cpu", require_review=True, questions_per_doc=0)
    cfg = KfreshConfig.model_validate(data)
    with open_store(cfg.store) as store:
        store.upsert(DocumentIn("tower", "The Orvik Tower is 212 metres tall.", source="city/a"), ["x"])
        store.upsert(DocumentIn("ferry", "The Saltmarsh ferry departs from Pier 12.", source="city/b"), ["x"])
        store.record_citations([("ferry", 1), ("ferry", 1)])
    first = run_distill(cfg, dry_run=True)
    assert first.new_facts == [] and first.status == "dry_run"  # nothing approved yet: nothing to learn
    with ReviewQueue(Path(cfg.finetune.work_dir) / QUEUE_FILE) as queue:
        items = queue.items()
        assert {i.fact.object for i in items} == {"212 metres", "Pier 12"} and all(i.base_wrong for i in items)
        assert items[0].fact.doc_id == "ferry" and items[0].cited == 2  # both wrong closed-book: most cited first
        queue.decide([items[0].id], "approved", by="ana")
    second = run_distill(cfg, dry_run=True)
    assert [f.object for f in second.new_facts] == ["Pier 12"]
    assert json.loads((second.run_dir / "facts.jsonl").read_text().splitlines()[0])["object"] == "Pier 12"
    assert time.time() - items[0].added_at < 600
