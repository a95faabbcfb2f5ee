"""Shared harness of the reliability suite: a retrieval-only server subprocess, the client's exact model
of what was acknowledged (per document) and the kill-round report, and the figures file the README quotes.
The SIGKILL rounds under streaming ingest that use them are in kill_helper.py.

The fast tests run a few rounds; `make reliability` (KFRESH_RELIABILITY=1, marker `reliability`) runs
the long ones and records their figures in benchmarks/results/reliability-<date>.json/.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from kfresh.client import SERVICE_NAME, KfreshClient

REPO_ROOT = Path(__file__).resolve().parents[1]
LONG = os.environ.get("KFRESH_RELIABILITY") == "1"
long_only = pytest.mark.skipif(not LONG, reason="long reliability suite: run `make reliability`")
UNREACHABLE = "http://127.0.0.1:9"  # nothing listens on the discard port: a remote backend that is down


# -- a retrieval-only server subprocess ------------------------------------------------------------
def start_server(home: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """`kfresh serve` with the remote model unreachable (no vLLM loads); logs to home/server-<port>.log."""
    cmd = [
        sys.executable, "-m", "kfresh.cli", "serve", "--server.port", str(port),
        "--store.path", str(home / "kfresh.db"), "--index.snapshot_dir", str(home / "index"),
        "--generation.backend", "remote", "--generation.remote_url", UNREACHABLE, *extra,
    ]  # fmt: skip
    log = open(home / f"server-{port}.log", "ab")  # noqa: SIM115 - owned by the child
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def wait_serving(addr: str, proc: subprocess.Popen[bytes], timeout_s: float = 180) -> float:
    """Seconds until the index service reports SERVING; fails fast if the process died."""
    start = time.monotonic()
    with KfreshClient(addr) as client:
        while time.monotonic() - start < timeout_s:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode} before serving")
            try:
                if client.health(SERVICE_NAME, timeout=1) == 1:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"server not SERVING after {timeout_s} s")


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# -- what the client was told, per document --------------------------------------------------------
@dataclass
class DocModel:
    """The client's knowledge of one document: the last acknowledged state and what was sent after it."""

    acked_version: int = 0
    acked_rev: int = -1  # revision number written into the text of the acknowledged version
    sent_rev: int = -1  # highest revision ever sent (an unacknowledged send may still have committed)
    delete_acked: bool = False
    delete_sent: bool = False


def doc_text(doc_id: str, rev: int) -> str:
    n = sum(map(ord, doc_id)) * 31 + rev
    return f"Ledger {doc_id} revision {rev}: vault {doc_id} holds {n} silver coins and {rev + 7} keys."


@dataclass
class KillReport:
    rounds: int = 0
    upserts_acked: int = 0
    deletes_acked: int = 0
    lost: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # an older version served after a newer one was acked
    half_applied: list[str] = field(default_factory=list)
    acks_at_kill: list[int] = field(default_factory=list)
    kill_after_s: list[float] = field(default_factory=list)
    recovery_kills: int = 0
    damaged_snapshots: int = 0
    restart_s: list[float] = field(default_factory=list)
    checked_searches: int = 0
    seconds: float = 0.0

    def figures(self, docs: dict[str, DocModel]) -> dict[str, Any]:
        live = sum(1 for m in docs.values() if m.acked_version and not m.delete_acked)
        return {
            "kill_rounds": self.rounds, "upserts_acknowledged": self.upserts_acked,
            "deletes_acknowledged": self.deletes_acked, "distinct_documents_acknowledged": live,
            "lost": len(self.lost), "stale_versions_served": len(self.stale), "half_applied": len(self.half_applied),
            "recovery_kills": self.recovery_kills, "damaged_snapshots_rebuilt": self.damaged_snapshots,
            "acks_before_kill_median": statistics.median(self.acks_at_kill) if self.acks_at_kill else 0,
            "restart_to_serving_s_median": round(statistics.median(self.restart_s), 2) if self.restart_s else 0,
            "searches_checked": self.checked_searches, "seconds": round(self.seconds, 1),
        }  # fmt: skip


# -- figures for the README ------------------------------------------------------------------------
def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {}
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2), "max_ms": round(ms[-1], 2)}  # fmt: skip


def record(section: str, figures: dict[str, Any]) -> None:
    """Merge one section's figures into today's results files (long suite only; the fast suite never writes)."""
    if not LONG:
        return
    day = dt.date.today().isoformat()
    out = REPO_ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"reliability-{day}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"date": day, "machine": _machine()}
    data[section] = figures
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    lines = [f"# Reliability suite, {day}", "", f"`make reliability` on {data['machine']}.", ""]
    for name, values in data.items():
        if isinstance(values, dict):
            lines += [f"## {name}", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v) if isinstance(v, dict | list) else v} |" for k, v in values.items()]
            lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores, Python {sys.version.split()[0]}"
