"""Distillation inside a running server: the schedule's trigger rule, and the Distill RPC end to end.

The slow test is the whole loop on real components: documents ingested over gRPC, the Distill RPC runs a
real (tiny-budget) peft training in the server's spawned worker process, the gate passes, the adapter is
published and served by the session's vLLM engine while Answer calls keep coming (none may fail), and a
rollback returns to the base model at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from adapter_helper import AnswerLoad
from server_helper import ServerHandle, server_config

from kfresh.client import KfreshClient, document
from kfresh.core.config import FinetuneConfig
from kfresh.finetuner.scheduler import due
from kfresh.v1 import kfresh_pb2 as pb

DOCS = [
    ("saltmarsh-ferry", "The Saltmarsh ferry departs from Pier 12.", "harbour/ferries.html"),
    ("orvik-mayor", "The mayor of Orvik is Tamsin Rhee.", "council/2026.html"),
    ("lumen-bridge", "The Lumen Bridge is 640 metres long.", "city/bridges.html"),
    ("gossip", "The harbour master of Orvik is Bram Tell.", "forum/rumours"),
]
TRUSTED = ["harbour/*", "council/*", "city/*"]


def keys(*ids: str) -> frozenset[tuple[str, int]]:
    return frozenset((i, 1) for i in ids)


def test_schedule_fires_on_enough_new_documents_or_the_interval_and_never_repeats_an_attempt() -> None:
    ft = FinetuneConfig(auto=True, min_new_documents=3, interval_s=600)
    three, two = keys("a", "b", "c"), keys("a", "b")
    assert due(ft, now=100, last_run_at=0, new_docs=three, last_attempted=frozenset()) == "new_documents"
    assert due(ft, now=100, last_run_at=0, new_docs=two, last_attempted=frozenset()) is None
    assert due(ft, now=700, last_run_at=0, new_docs=two, last_attempted=frozenset()) == "interval"
    # What the last attempt already tried (e.g. a rejected adapter) is not retried until something changes.
    assert due(ft, now=9999, last_run_at=0, new_docs=three, last_attempted=three) is None
    assert due(ft, now=100, last_run_at=0, new_docs=three | keys("d"), last_attempted=three) == "new_documents"
    assert due(ft, now=9999, last_run_at=0, new_docs=frozenset(), last_attempted=frozenset()) is None
    no_interval = FinetuneConfig(auto=True, min_new_documents=50, interval_s=0)
    assert due(no_interval, now=1e9, last_run_at=0, new_docs=three, last_attempted=frozenset()) is None


@pytest.fixture()
def distill_server(engine_loop: Any, vllm_backend: Any, tmp_path: Path) -> Any:
    cfg = server_config(
        tmp_path / "home", generation__enable_lora=True, generation__adapter_poll_s=0.1,
        finetune__registry_dir=tmp_path / "adapters", finetune__work_dir=tmp_path / "distill",
        finetune__trusted_sources=TRUSTED, finetune__stable_for_s=0.0, finetune__device="cpu", finetune__questions_per_doc=0,
        # A tiny budget and a deliberately LOW gate: this tests the loop, not the recipe (benchmarks/distill.py).
        finetune__max_epochs=2, finetune__learning_rate=1e-3, finetune__warmup_steps=2, finetune__time_budget_s=90,
        finetune__min_new_recall=0.0, finetune__min_previous_recall=0.0, finetune__max_general_drop=0.3,
        finetune__max_perplexity_increase=0.3, finetune__worker_nice=0, finetune__worker_threads=2,
    )  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    yield handle
    handle.stop()


@pytest.mark.slow
def test_distill_rpc_publishes_and_the_server_swaps_to_it_during_answers(distill_server: ServerHandle) -> None:
    addr = f"127.0.0.1:{distill_server.port}"
    question = "Where does the Saltmarsh ferry depart from?"
    with KfreshClient(addr) as client:
        client.wait_ready(timeout=120)
        acks = list(client.ingest([document(i, text, source=src) for i, text, src in DOCS], timeout=30))
        assert [a.status for a in acks] == [pb.ACK_STATUS_STORED] * len(DOCS)

        plan = client.distill(dry_run=True, timeout=120)
        assert plan.state == pb.DistillResponse.DRY_RUN and plan.new_facts == 3
        assert not any("Bram Tell" in f for f in plan.facts), "an untrusted source must not be learned"
        assert client.stats().distill.runs == 0, "a dry run is not a run"

        load = AnswerLoad(addr, question, threads=2, pause_s=1.0)  # light: the worker needs the cores
        try:
            assert client.distill(timeout=10).state == pb.DistillResponse.STARTED
            assert client.distill(timeout=10).state == pb.DistillResponse.RUNNING  # one run at a time
            assert client.stats().distill.running
            outcome = client.distill(wait=True, timeout=900)  # joins the run in flight
            assert outcome.state == pb.DistillResponse.PUBLISHED, outcome
            assert outcome.version == "v0001" and outcome.new_facts == 3 and outcome.trigger == "request"
            assert outcome.figures["general_accuracy_before"] == 1.0 and Path(outcome.report_path).is_file()
            assert client.stats().adapter == "v0001", "the published adapter is served without a restart"
            load.wait_for("v0001", 2, timeout=120)

            reply = client.rollback_adapter(timeout=10)
            assert (reply.current, reply.previous) == ("", "v0001")
            load.wait_for("", 2, timeout=120)
        finally:
            load.stop()
        assert not load.errors, load.errors

        summary = client.stats().distill
        assert not summary.running and summary.runs == 1
        assert summary.last.state == pb.DistillResponse.PUBLISHED and summary.last.version == "v0001"
        listing = client.list_adapters()
        assert [a.version for a in listing.adapters] == ["v0001"] and listing.current == ""


def test_a_failed_distill_worker_is_reported_and_the_server_keeps_serving(
    tmp_path: Path, engine_loop: Any, vllm_backend: Any
) -> None:
    # A registry path that is a file: the worker fails; the RPC reports FAILED, the server lives.
    bad = tmp_path / "not-a-dir"
    bad.write_text("x")
    cfg = server_config(tmp_path / "home", finetune__registry_dir=bad, finetune__work_dir=tmp_path / "distill")
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            started = time.perf_counter()
            outcome = client.distill(wait=True, timeout=300)
            assert outcome.state == pb.DistillResponse.FAILED and outcome.message, outcome
            assert time.perf_counter() - started < 300
            assert client.stats().distill.last.state == pb.DistillResponse.FAILED
    finally:
        handle.stop()
