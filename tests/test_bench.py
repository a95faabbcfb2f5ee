"""Smoke tests of `kfresh bench`: every suite in --quick mode writes well-formed JSON, Markdown and PNG files.

Tiny sizes and no timing asserts: the figures of a quick run mean nothing, the plumbing does. The answer
suite reuses the session's vLLM engine and `vllm serve` (conftest) instead of starting its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfresh.benchmarks import answer
from kfresh.benchmarks.cli import SUITES, run_suite
from kfresh.benchmarks.report import write_result
from kfresh.testing.pgcluster import find_pg_bin

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_well_formed(written, suite: str) -> dict:
    data = json.loads(written.json.read_text())
    assert data["suite"] == suite and data["quick"] is True
    assert data["summary"] and data["raw"] and data["settings"]
    for key in ("cpu", "cores", "gpu", "versions", "load_average_1m_start", "load_average_1m_end"):
        assert key in data["env"], key
    text = written.markdown.read_text()
    assert text.startswith("# ") and "| " in text and "Command: `" in text
    assert written.png is not None and written.png.read_bytes()[:8] == PNG_MAGIC
    return data


def test_bench_help_explains_every_suite():
    out = subprocess.run(
        [sys.executable, "-m", "kfresh.cli", "bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for suite in (*SUITES, "all"):
        assert f"{suite}:" in out.stdout
    assert "--quick" in out.stdout and "--addr" in out.stdout


def test_bad_option_is_rejected(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        run_suite("ingest", quick=True, out=tmp_path, overrides={"no_such_option": 1})


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["ingest", "freshness", "retrieval"])
def test_index_suites_quick(suite, tmp_path):
    data = assert_well_formed(run_suite(suite, quick=True, out=tmp_path), suite)
    if suite == "ingest":
        assert {lv["streams"] for lv in data["raw"]["levels"]} == {1, 4}
    if suite == "freshness":
        assert len(data["raw"]["lag_ms"]) == 6 and data["summary"]["probe_timeouts"] == 0
        window = data["summary"]["server_window_lag_ms"]  # the server's view of the probes' window (Watch)
        assert window["n"] >= 6 and 0 < window["p50"] <= window["max"]
    if suite == "retrieval":
        sizes = data["raw"]["sizes"]
        assert [s["vectors"] for s in sizes] == ["real", "derived from 200 real"]
        assert all(0.0 <= s["systems"]["server"]["recall"] <= 1.0 for s in sizes)


@pytest.mark.slow
def test_filters_quick_is_exact_at_every_selectivity_and_flags_short_replies(tmp_path):
    data = assert_well_formed(run_suite("filters", quick=True, out=tmp_path), "filters")
    runs = {r["kind"]: r for r in data["raw"]["runs"]}
    assert set(runs) == {"flat", "ivf"}
    for kind, run in runs.items():
        for name, f in run["filters"].items():
            if kind == "flat" or name not in ("none", "50%"):  # IVF's unfiltered and common-value searches approximate
                assert f["recall"] == 1.0, (kind, name)
            # 400 documents: a 1%, 0.01% or single-document filter matches fewer than k=10; the reply says so
            assert f["short_replies"] == f["expected_short"] == f["all_matches_flag"], (kind, name)


def test_ingest_compares_every_backend_with_plain_sentence_transformers():
    from kfresh.benchmarks.ingest import _versus_sentence_transformers

    levels = [{"backend": b, "streams": s, "docs_per_s": d, "encode_docs_per_s": e}
              for b, s, d, e in [("torch", 1, 90.0, 100.0), ("torch", 4, 95.0, 100.0), ("onnx", 1, 150.0, 160.0),
                                 ("onnx", 16, 150.0, 160.0)]]  # fmt: skip
    _versus_sentence_transformers(levels)
    assert [lv.get("st_ratio") for lv in levels] == [0.9, 0.95, 1.5, None]  # no torch level at 16 streams


def test_backends_quick_runs_faiss_torch_and_milvus_on_the_same_vectors(tmp_path):
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install -r requirements.txt)")
    from kfresh.benchmarks.backends import BACKENDS

    data = assert_well_formed(run_suite("backends", quick=True, out=tmp_path), "backends")
    (size,) = data["raw"]["sizes"]
    measured = {b["backend"]: b for b in size["backends"]}
    assert list(measured) == list(BACKENDS)
    assert measured["faiss-flat"]["recall"] == measured["milvus-flat"]["recall"] == 1.0  # both exact
    assert measured["torch"]["recall"] >= 0.99  # exact too (float sums may reorder a near-tie)
    assert all(max(b["searches"]) == 1 for b in measured.values())  # visible to the very next search
    assert data["summary"][str(size["size"])]["milvus-flat_vs_faiss-flat_p50"] > 0
    assert data["summary"][str(size["size"])]["torch_vs_faiss-flat_p50"] > 0


@pytest.mark.slow
def test_history_quick_times_every_mode_and_sizes_the_history(tmp_path):
    data = assert_well_formed(run_suite("history", quick=True, out=tmp_path), "history")
    (run,) = data["raw"]["runs"]
    assert len(run["ms"]["live"]) == len(run["live_without_history_ms"]) == 4
    assert len(run["ms"]["as_of"]) == len(run["ms"]["valid_at"]) == 3
    assert run["recall"] == {"as_of": [1.0] * 3, "valid_at": [1.0] * 3}  # the exact top 10 of the right slice
    one, both = run["bytes_by_versions"]
    assert both > one  # the replaced versions are kept
    assert run["memory_bytes"] > 0 and run["catch_up"]["changes"] == 300


def test_replicas_quick_measures_both_replicas(tmp_path, pg_dsn):
    data = assert_well_formed(run_suite("replicas", quick=True, out=tmp_path, overrides={"dsn": pg_dsn}), "replicas")
    assert len(data["raw"]["lag_a_ms"]) == len(data["raw"]["lag_b_ms"]) == 4
    assert data["summary"]["probe_timeouts"] == 0 and "dsn" not in data["settings"]
    assert data["summary"]["documents_seen_by_a_and_b"][0] == data["summary"]["documents_seen_by_a_and_b"][1]


@pytest.mark.slow
def test_answer_quick_both_backends(tmp_path, engine_loop, vllm_backend, remote_vllm_server):
    from server_helper import ServerHandle, server_config

    from kfresh.client import KfreshClient
    from kfresh.core.config import GenerationConfig
    from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

    opts = answer.AnswerOptions.quick()
    pairs = []
    handle = ServerHandle(engine_loop, server_config(tmp_path / "inproc"), vllm_backend)
    try:
        pairs.append(
            engine_loop.run(
                answer.measure_pair("vllm", f"127.0.0.1:{handle.port}", opts, backend=vllm_backend), timeout=600
            )
        )
    finally:
        handle.stop()
    remote = OpenAIRemoteBackend(GenerationConfig(backend="remote", remote_url=remote_vllm_server))
    cfg = server_config(tmp_path / "remote", generation__backend="remote", generation__remote_url=remote_vllm_server)
    handle = ServerHandle(engine_loop, cfg, remote)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            client.wait_ready(timeout=120)
        pairs.append(
            engine_loop.run(
                answer.measure_pair("remote", f"127.0.0.1:{handle.port}", opts, vllm_url=remote_vllm_server),
                timeout=600,
            )
        )
    finally:
        handle.stop()
        engine_loop.run(remote.shutdown(), timeout=30)
    result = answer.build_result(pairs, opts, quick=True, command="pytest tests/test_bench.py")
    data = assert_well_formed(write_result(result, tmp_path, answer.plot), "answer")
    for pair in data["raw"]["pairs"]:
        for path in ("grpc", "direct"):
            assert [lv["concurrency"] for lv in pair[path]] == [1, 2]
            assert all(
                not lv["errors"] and lv["samples"] and all(s["tokens"] > 0 for s in lv["samples"]) for lv in pair[path]
            )
    assert set(data["summary"]) == {"vllm", "remote"}


@pytest.mark.slow
def test_knowledge_quick(tmp_path):
    data = assert_well_formed(run_suite("knowledge", quick=True, out=tmp_path), "knowledge")
    assert set(data["summary"]) >= {"a", "b", "c", "d", "gate_passed"}
    rows = data["raw"]["rows"]
    assert {r["kind"] for r in rows} == {"fact", "general"}
    assert all(r[s] is not None for r in rows for s in "abcd")
    assert data["summary"]["a"]["corrected_n"] > 0, "the quick run must ask about corrected facts"


@pytest.mark.slow
def test_reading_quick_scores_every_stage_and_the_peer(tmp_path):
    """The reading suite end to end on a fixture in RealTimeQA's format (fictional news written for this test; the
    real file is read by path and never shipped): one `vllm serve`, kfresh over it, the LangChain chain beside it."""
    fixture = Path(__file__).parent / "data" / "realtimeqa-fixture.jsonl"
    data = assert_well_formed(
        run_suite("reading", quick=True, out=tmp_path, overrides={"dataset": str(fixture)}), "reading"
    )
    summary = data["summary"]
    assert len(data["raw"]["questions"]) == 6 and summary["n"] == 6
    assert summary["hit"] == 1.0  # six distinct fictional stories: the evidence is always retrieved
    assert summary["oracle"] >= 0.5 and summary["e2e"] >= 0.5  # the answer sentence is quoted when the model drops it
    assert summary["peer_e2e"] is not None and summary["closed_book"] is not None
    assert set(summary["variants"]) == {"default", "k=1", "before"}
    assert 0.0 <= summary["deleted_refused"] <= 1.0 and summary["false_refusal"] == 0.0
    assert set(summary["retrieval_levers"]) == {"dense (kfresh Retrieve)", "BM25 (bm25s)", "hybrid: RRF k=60"}


@pytest.mark.slow
def test_chaos_quick_checks_the_history_under_every_kind_of_fault(tmp_path):
    """`make chaos` in small: two replicas over a throwaway PostgreSQL, 4 faults; the checker's verdict is clean."""
    if find_pg_bin() is None:
        pytest.skip("needs Debian's postgresql binaries")
    from kfresh.benchmarks.chaos import FAULTS
    from kfresh.testing.nats import nats_bin

    data = assert_well_formed(run_suite("chaos", quick=True, out=tmp_path), "chaos")
    s = data["summary"]
    assert s["rounds"] == len(FAULTS) and s["acked"] > 10 and s["reads"] > 10 and s["ryw_checked"] > 0
    assert (s["lost"], s["resurrected"], s["monotonic_violations"], s["ryw_violations"], s["crashes"]) == (
        0, 0, 0, 0, 0), data["raw"]["verdict"]  # fmt: skip
    assert s["passed"] is True
    assert all("healed" in f for f in data["raw"]["faults"])
    # Every kind of fault once (the consumer's and the full disk's where nats-server and root are there).
    expected = {*FAULTS} - ({"consumer-kill"} if nats_bin() is None else set()) - (
        {"disk-full"} if os.geteuid() != 0 else set())  # fmt: skip
    assert set(s["faults"]) == expected, s["faults"]
    if nats_bin() is not None:
        assert s["acked_via_nats"] > 10


def test_chaos_checker_finds_a_lost_write_a_resurrected_delete_and_a_stale_read():
    """The checker on hand-made histories: each anomaly is reported, an unknown outcome is accepted either way."""
    from kfresh.benchmarks.chaos import ChaosOptions, History, allowed_final, check

    w = lambda rev, kind="upsert", outcome="ok": {"op": "write", "doc": "a-0", "rev": rev, "kind": kind,  # noqa: E731
                                                  "outcome": outcome, "seq": rev, "t0": rev, "t1": rev}  # fmt: skip
    assert allowed_final([w(1), w(2, outcome="DEADLINE_EXCEEDED")]) == {1, 2}
    assert allowed_final([w(1), w(2, "delete")]) == {None}
    assert allowed_final([w(1, outcome="UNAVAILABLE")]) == {None, 1}
    history = History()
    history.ops = [w(1), w(2), w(3, "delete"),
                   {"op": "read", "doc": "a-0", "on": "A", "t0": 2.5, "t1": 2.6, "outcome": "ok", "seen": 2},
                   {"op": "read", "doc": "a-0", "on": "A", "t0": 2.7, "t1": 2.8, "outcome": "ok", "seen": 1},
                   {"op": "ryw", "doc": "a-0", "rev": 2, "kind": "upsert", "on": "B", "t0": 2, "t1": 2.1,
                    "outcome": "ok", "seen": 1, "violated": True}]  # fmt: skip
    verdict = check(history, ChaosOptions.quick(), {"A": {"a-0": 2}, "B": {"a-0": None}})
    assert [v["replica"] for v in verdict["resurrected"]] == ["A"] and verdict["lost"] == []
    assert [(v["served"], v["after"]) for v in verdict["monotonic"]] == [(1, 2)]
    assert len(verdict["ryw_violations"]) == 1
    verdict = check(history, ChaosOptions.quick(), {"A": {"a-0": None}, "B": {"a-0": None}})
    assert verdict["resurrected"] == [] and verdict["lost"] == []
    history.ops = [w(1), w(2)]
    assert [v["served"] for v in check(history, ChaosOptions.quick(), {"A": {"a-0": None}})["lost"]] == [None]


def test_conflicts_quick_compares_the_name_rule_on_corrections_and_news(tmp_path):
    """The offline selection suite: the corrections pairs (the real ones) and a RealTimeQA-format fixture."""
    fixture = Path(__file__).parent / "data" / "realtimeqa-fixture.jsonl"
    written = run_suite("conflicts", quick=True, out=tmp_path, overrides={"dataset": str(fixture)})
    data = assert_well_formed(written, "conflicts")
    summary = data["summary"]
    assert data["settings"]["named_similarities"] == [1.01, 0.4]
    # Off, unlinked corrections worded afresh lose to their stories; with the rule every one is shown alone.
    assert summary["fix_shown_blind_1.01"] < summary["fix_shown_blind_0.4"] == 1.0
    assert summary["fix_shown_here_0.4"] == 1.0
    # Asked at its date, a question cannot see later weeks; its evidence is shown at least as often.
    for period in ("dev", "test"):
        for value in ("1.01", "0.4"):
            assert summary[f"evidence_shown_{period}_then_{value}"] >= summary[f"evidence_shown_{period}_now_{value}"]
    assert "| 0.4 (default) |" in written.markdown.read_text()


@pytest.mark.slow
def test_reading_measures_a_reader_folder_on_its_own_vllm_serve(tmp_path, generator_path):
    """`--set reader=FOLDER` serves that folder on a second `vllm serve` for the reader's variants; here the base
    folder itself, so the reader's rows read as well as the default's (bf16 batching may change a word or two)."""
    fixture = Path(__file__).parent / "data" / "realtimeqa-fixture.jsonl"
    overrides = {"dataset": str(fixture), "reader": generator_path, "variants": [{"name": "default"}], "peer": False,
                 "deleted": False, "closed_book": False, "ttft_probe": 0}  # fmt: skip
    data = assert_well_formed(run_suite("reading", quick=True, out=tmp_path, overrides=overrides), "reading")
    variants = data["summary"]["variants"]
    assert set(variants) == {"default", "reader", "reader, prompt_passages=all (3)"}
    assert len(data["raw"]["groups"]) == 3  # the default's server, then the reader's two settings
    assert variants["reader"]["e2e"] >= 0.5 and variants["reader"]["hit"] == 1.0


@pytest.mark.slow
def test_transfer_quick_compares_question_pairs_with_template_facts(tmp_path):
    """The transfer suite on the fixture in RealTimeQA's format: the real teacher (SmolLM2 reading each document)
    keeps grounded pairs; every figure the README cites is there and in range."""
    fixture = Path(__file__).parent / "data" / "realtimeqa-fixture.jsonl"
    overrides = {"dataset": str(fixture), "start": "2025-01-01"}
    data = assert_well_formed(run_suite("transfer", quick=True, out=tmp_path, overrides=overrides), "transfer")
    summary = data["summary"]
    assert summary["documents"] == 6 and summary["pairs_document_share"] > 0
    for key in ("pairs_document_share", "templates_document_share", "pairs_right_choice_coverage",
                "templates_right_choice_coverage", "evidence_right_choice_share"):  # fmt: skip
        assert 0.0 <= summary[key] <= 1.0
    pairs = data["raw"]["transfer"]["pairs"]
    assert pairs and all(p["span"].lower() in p["answer"].lower() for p in pairs)


@pytest.mark.slow
def test_knowledge_news_quick_distils_real_text_and_asks_the_quiz(tmp_path):
    """The real-news knowledge suite on the fixture: Indexer ingest, run_distill with question pairs (teacher,
    real training on a tiny budget, the gate), then the quiz in the four settings. Figures are shares."""
    fixture = Path(__file__).parent / "data" / "realtimeqa-fixture.jsonl"
    overrides = {"dataset": str(fixture), "start": "2025-01-01"}
    written = run_suite("knowledge_news", quick=True, out=tmp_path, overrides=overrides)
    data = assert_well_formed(written, "knowledge_news")
    summary = data["summary"]
    for key in ("base_closed_book", "base_retrieval", "adapter_closed_book", "adapter_retrieval", "evidence_shown"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["pairs"] > 0 and summary["pairs_per_document"] > 0
    assert len(data["raw"]["rows"]) == 3 and {"a", "b", "c", "d"} <= set(data["raw"]["rows"][0])
    assert any(c["name"] == "new_pairs_recall" for c in data["raw"]["gate"]["checks"])


def test_results_folder_has_only_complete_runs():
    """Every committed full run has its JSON, Markdown and PNG, and the Markdown names the command."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for json_path in results.glob("*.json"):
        data = json.loads(json_path.read_text())
        if not isinstance(data, dict) or data.get("suite") not in SUITES:
            continue  # foundation/adapters/distill files predate the suites
        assert not data["quick"], json_path
        assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").is_file(), json_path
        assert f"kfresh bench {data['suite']}" in json_path.with_suffix(".md").read_text()


def test_freshness_load_is_a_share_of_the_maximum_or_a_fixed_rate():
    from kfresh.benchmarks.freshness import FreshnessOptions, _load_target

    assert _load_target(FreshnessOptions(), 276.0) == 138.0
    assert _load_target(FreshnessOptions(load_fraction=0.25, load_rate=100.0), 276.0) == 100.0


def test_a_suite_removes_the_server_home_it_prepared(tmp_path):
    """A preloaded home is a copy of a store (GBs at 1M documents): it must not stay behind in /tmp."""
    from kfresh.testing.servers import NO_GENERATION, kfresh_server

    home = tmp_path / "home"
    home.mkdir()
    with kfresh_server(NO_GENERATION, home=home, remove_home=True) as target:
        assert target.home == home and (home / "kfresh.db").exists()
    assert not home.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with kfresh_server(NO_GENERATION, home=kept):
        pass
    assert (kept / "kfresh.db").exists()  # a home the caller owns stays by default


def test_lanes_benchmark_measures_both_embedders(tmp_path):
    pytest.importorskip("onnxruntime")
    from kfresh.benchmarks.lanes import measure

    rows = measure(docs=8, rounds=2, competitors=(0, 1))
    assert [(r["busy_processes"], r["round"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["single_docs_per_s"] > 0 and r["lanes_docs_per_s"] > 0 and r["lanes"] >= 1 for r in rows)


@pytest.mark.slow
def test_gpu_script_runs_without_kfresh_installed_and_reports(tmp_path):
    """What the lent GPU machine runs: no kfresh, pydantic or faiss import; here CUDA is absent, so the CPU rows."""
    pytest.importorskip("peft")
    from kfresh.benchmarks import gpu

    root = Path(__file__).resolve().parents[1]
    assert gpu.pack(tmp_path / "pack") < gpu.CARRY_LIMIT
    script = (
        "import runpy, sys\n"
        "sys.modules['kfresh'] = None\n"  # as there: not installed
        f"sys.argv = ['gpu_device.py', '--pack', {str(tmp_path / 'pack')!r}, '--out', {str(tmp_path / 'out')!r},"
        " '--vectors', '5000', '--queries', '40', '--docs', '64', '--cpu-lora-steps', '1', '--lora-tokens', '8']\n"
        f"runpy.run_path({str(root / 'benchmarks' / 'gpu_device.py')!r}, run_name='__main__')\n"
        "assert not {'pydantic', 'faiss', 'vllm'} & set(sys.modules), 'a dependency the GPU machine lacks'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    device = json.loads((tmp_path / "out" / "gpu-device.json").read_text())
    assert [s["recall_at_10_vs_float64"] for s in device["search"]] == [1.0] * len(device["search"])
    mine = gpu.here(tmp_path / "pack", 5000, 40, 32, lora_steps=1, lora_tokens=8)
    written = gpu.report(device, mine, tmp_path / "results", "test")
    text = written.markdown.read_text()
    assert "FAISS flat" in text and "LoRA step" in text and "torch index" in text


def test_newest_wins_judges_the_models_words_and_the_citation():
    from kfresh.benchmarks.newest_wins import Pair, judge

    p = Pair("here", "Who coaches the Hawks?", "Delia Brusk coaches.", "Owen Maddery replaced Delia Brusk.",
             "Owen Maddery", "Delia Brusk")  # fmt: skip
    quoted = 'Delia Brusk coaches the Hawks.\n\n[1] "Owen Maddery replaced Delia Brusk."'
    assert judge(p, quoted, ["fix"], "story", "fix")["right"] is False  # the quote is right, the model's words old
    assert judge(p, "Owen Maddery, who replaced Delia Brusk.", ["fix"], "story", "fix")["right"] is True
    assert judge(p, "Owen Maddery.", ["story"], "story", "fix") == {
        "right": False, "read_fix": False, "read_old": True, "said_old": False, "reply": "Owen Maddery.", "cited": ["story"]
    }  # fmt: skip


@pytest.mark.slow
def test_newest_wins_quick_asks_every_way(tmp_path):
    data = assert_well_formed(run_suite("newest_wins", quick=True, out=tmp_path), "newest_wins")
    answers = data["raw"]["answers"]
    assert set(answers) == {"upsert", "supersedes", "separate", "ceiling"}
    assert all(len(got) == 2 for got in answers.values())
    assert all(a["right"] for a in answers["upsert"] + answers["supersedes"])  # a linked correction always wins
