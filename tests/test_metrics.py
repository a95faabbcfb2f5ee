"""Prometheus metrics of a real server: the exposition parses, the events counted are the ones that
happened, a real Prometheus scrapes it, and the shipped alerting rules pass `promtool check rules`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helper import ServerHandle, server_config

from kfresh.client import KfreshClient, document
from kfresh.core.net import free_port

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    handle = ServerHandle(engine_loop, server_config(tmp_path_factory.mktemp("metrics")), vllm_backend)
    yield handle
    handle.stop()


def test_metrics_count_what_happened(server: ServerHandle) -> None:
    assert server.metrics_port
    before = scrape(server.metrics_port)
    with KfreshClient(f"127.0.0.1:{server.port}") as client:
        client.wait_ready(timeout=120)
        docs = [document(f"m-{i}", f"Metrics note {i}: dock {i} opens at {i + 6} o'clock.") for i in range(5)]
        acks = list(client.ingest(docs, timeout=30))
        for ack in acks:
            while not any(c.doc_id == ack.id for c in client.retrieve(f"Metrics note {ack.id[2:]}", k=5).chunks):
                time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as bad:
            client.retrieve("", timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        answer = list(client.answer("When does dock 3 open?", max_tokens=8, timeout=120))
        assert answer[-1].HasField("done")
    after = scrape(server.metrics_port)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("kfresh_documents_acked_total", op="upsert", status="stored") == 5
    assert grew("kfresh_freshness_lag_seconds_count") == 5
    assert 1 <= grew("kfresh_indexer_stage_seconds_count", stage="embed") <= 5  # micro-batches that embedded the 5
    assert grew("kfresh_indexer_stage_seconds_sum", stage="embed") > 0
    assert grew("kfresh_rpcs_total", method="Ingest", code="OK") == 1
    assert grew("kfresh_rpcs_total", method="Retrieve", code="INVALID_ARGUMENT") == 1
    assert grew("kfresh_rpcs_total", method="Retrieve", code="OK") >= 5
    assert grew("kfresh_rpcs_total", method="Answer", code="OK") == 1
    assert grew("kfresh_time_to_first_token_seconds_count") == 1
    looked_up = grew("kfresh_query_embedding_cache_total", result="miss") + grew(
        "kfresh_query_embedding_cache_total", result="hit"
    )
    assert grew("kfresh_query_embedding_cache_total", result="miss") >= 5  # five distinct queries, at least
    assert looked_up >= grew(
        "kfresh_rpcs_total", method="Retrieve", code="OK"
    )  # every valid query went through the cache
    assert grew("kfresh_output_tokens_total", adapter="") > 0
    assert value(after, "kfresh_documents") >= 5 and value(after, "kfresh_ingest_queue_capacity") > 0
    assert ("kfresh_ingest_queue_depth", ()) in after


def test_a_real_prometheus_scrapes_the_server(server: ServerHandle, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is missing (Debian package `prometheus`; .ci/run installs it)")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{ALERTS}]\n"
        f"scrape_configs: [{{job_name: kfresh, static_configs: [{{targets: ['127.0.0.1:{server.metrics_port}']}}]}}]\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    try:
        query = urllib.parse.urlencode({"query": "kfresh_documents"})
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                reply = json.loads(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5).read()
                )
                if reply["data"]["result"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus never scraped kfresh"
            time.sleep(0.5)
        assert float(reply["data"]["result"][0]["value"][1]) >= 0
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).read())
        assert len(rules["data"]["groups"][0]["rules"]) >= 5 and all(
            r["health"] == "ok" for r in rules["data"]["groups"][0]["rules"]
        )
    finally:
        proc.terminate()
        proc.wait(30)


def test_alert_rules_are_valid_and_name_real_metrics() -> None:
    import kfresh.core.metrics as metrics

    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}  # counters/histograms/gauges
    exported |= {"kfresh_ingest_queue_depth", "kfresh_ingest_queue_capacity", "kfresh_documents", "kfresh_chunks"}
    used = set(re.findall(r"\bkfresh_[a-z_]+", ALERTS.read_text()))
    suffixes = ("_bucket", "_count", "_sum", "_total")
    missing = {
        u
        for u in used
        if u not in exported and not any(u.endswith(s) and u.removesuffix(s) in exported for s in suffixes)
    }
    assert not missing, f"alerts.yml uses metrics kfresh does not export: {missing}"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian package `prometheus`; .ci/run installs it)")
    out = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
