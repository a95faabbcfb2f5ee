"""`kfresh demo`: a real server in a subprocess, a corpus that changes, answers that change with it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from kfresh.cli.render import print_citations
from kfresh.core.config import KfreshConfig
from kfresh.core.net import free_port

QUESTIONS = (
    "From which pier does the ferry to Lenn Island depart?",
    "Who is the mayor of Port Avel?",
)


def _sample(name: str) -> str:
    return str(resources.files("kfresh") / "samples" / name)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _ask(client: object, question: str, label: str = "", **options: float) -> str:
    print(f"\nQ{label}: {question}\nA: ", end="", flush=True)
    parts: list[str] = []
    for event in client.answer(question, timeout=120, **options):  # type: ignore[attr-defined]
        if event.HasField("done"):
            print()
            print_citations(event.done)
        else:
            parts.append(event.delta)
            print(event.delta, end="", flush=True)
    return "".join(parts)


def _ingest(client: object, name: str) -> None:
    from kfresh.client.sources import read_source
    from kfresh.v1 import kfresh_pb2 as pb

    for ack in client.ingest(read_source(_sample(name)), timeout=60):  # type: ignore[attr-defined]
        status = pb.AckStatus.Name(ack.status).removeprefix("ACK_STATUS_").lower()
        print(f"  ack {ack.id:<14} version {ack.version}  {status}")


def _wait_searchable(client: object, query: str, doc_id: str, version: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunks = client.retrieve(query, k=4).chunks  # type: ignore[attr-defined]
        if any(c.doc_id == doc_id and c.version == version for c in chunks):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{doc_id} v{version} not searchable after {timeout} s")


def _start_server(cfg: KfreshConfig, home: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, KFRESH_HOME=str(home), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "kfresh.cli",
        "serve",
        "--server.port",
        str(port),
        "--store.path",
        str(home / "kfresh.db"),
        "--index.snapshot_dir",
        str(home / "index"),
        "--models.cache_dir",
        str(cfg.models.cache_dir.resolve()),
        "--generation.backend",
        cfg.generation.backend,
    ]
    if cfg.generation.enable_lora:
        cmd += ["--generation.enable_lora", "true", "--finetune.registry_dir", str(cfg.finetune.registry_dir.resolve())]
    log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server process
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_demo(cfg: KfreshConfig, *, keep: bool = False) -> int:
    from kfresh.client import SERVICE_NAME, KfreshClient
    from kfresh.provisioning import provision

    _banner("1/5 models (converted once, then cached)")
    provisioned = provision(cfg)
    for name in ("embedder", "generator"):
        print(f"  {name}: {provisioned[name]} ({float(provisioned[name + '_s']):.1f} s)")

    home = Path(tempfile.mkdtemp(prefix="kfresh-demo-"))
    port = free_port()
    _banner(f"2/5 starting `kfresh serve` on 127.0.0.1:{port} (data in {home})")
    server = _start_server(cfg, home, port)
    code = 1
    try:
        with KfreshClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout=120, service=SERVICE_NAME)
            print("  index ready; waiting for the model (vLLM engine start, ~30 s on 2 CPU cores)...", flush=True)
            client.wait_ready(timeout=300)
            _banner("3/5 day 1: streaming the first documents")
            _ingest(client, "port_avel_day1.jsonl")
            _wait_searchable(client, "ferry to Lenn Island pier", "harbor-ferry", 1)
            for q in QUESTIONS:
                _ask(client, q)
            day1_known = time.time()  # the knowledge base as it stands at the end of day 1

            _banner("4/5 day 2: a new ferry timetable (upsert) and a council recount (a correcting document)")
            _ingest(client, "port_avel_day2.jsonl")
            _wait_searchable(client, "ferry to Lenn Island pier", "harbor-ferry", 2)
            _wait_searchable(client, "mayor of Port Avel", "mayor-recount", 1)
            for q in QUESTIONS:
                _ask(client, q)
            print(
                "\n  Every version is kept: the same question over the knowledge base as it stood at the end of day 1"
            )
            _ask(client, QUESTIONS[1], " (as of day 1)", as_of=day1_known)

            _banner("5/5 server stats")
            stats = client.stats()
            f = stats.freshness
            adapter = f", adapter {stats.adapter or 'none'}" if cfg.generation.enable_lora else ""
            print(
                f"  documents {stats.documents}, chunks {stats.chunks}, model {stats.model} ({stats.generation_backend}){adapter}"
            )
            print(
                f"  acknowledged -> searchable: p50 {f.p50_ms:.1f} ms, p95 {f.p95_ms:.1f} ms, max {f.max_ms:.1f} ms over {f.count} changes"
            )
        code = 0
    except Exception as exc:
        print(f"\ndemo failed: {exc}\n--- server log ({home / 'server.log'}) ---", file=sys.stderr)
        print((home / "server.log").read_text(errors="replace")[-4000:], file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        print(f"\nserver stopped (exit code {server.returncode})")
        if keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    return code
