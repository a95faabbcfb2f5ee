"""When and how a server distils: on request (the Distill RPC) or on a schedule, one run at a time.

Training runs in a spawned, niced worker process (finetuner/worker.py), so the serving process keeps its
GIL and its latency. The schedule has two triggers: every `interval_s` seconds, and once
`min_new_documents` validated documents exist that the served adapter has not learned. A trigger fires
only when there is something new that the last attempt did not already try: a rejected adapter is not
retrained from the same documents over and over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfresh.core.config import FinetuneConfig, KfreshConfig

log = logging.getLogger("kfresh.finetuner")

DocKey = tuple[str, int]


@dataclass
class DistillOutcome:
    """A finished (or planned) run as the server reports it; `state` uses DistillResponse.State names."""

    state: str
    trigger: str
    version: str = ""
    facts: list[str] = field(default_factory=list)
    new_facts: int = 0
    kept_facts: int = 0
    figures: dict[str, float] = field(default_factory=dict)
    report_path: str = ""
    message: str = ""
    checks: dict[str, bool] = field(default_factory=dict)  # the gate's verdict per check

    @classmethod
    def from_result(cls, result: Any, trigger: str) -> DistillOutcome:
        """From a finetuner.distill.DistillResult."""
        state = {"dry_run": "DRY_RUN", "nothing_new": "NOTHING_NEW", "published": "PUBLISHED"}.get(
            result.status, "REJECTED"
        )
        numbers = {
            k: float(v) for k, v in result.figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        return cls(
            state=state, trigger=trigger, version=result.manifest.version if result.manifest else "",
            facts=[f.sentence for f in result.facts], new_facts=len(result.new_facts), kept_facts=len(result.carried_facts),
            figures=numbers, report_path=str(result.report_path or ""), checks=_checks(result.report_path),
        )  # fmt: skip


def _checks(report_path: Any) -> dict[str, bool]:
    if not report_path:
        return {}
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError):
        return {}
    return {c["name"]: bool(c["passed"]) for c in report.get("checks", [])}


def due(
    ft: FinetuneConfig,
    *,
    now: float,
    last_run_at: float,
    new_docs: frozenset[DocKey],
    last_attempted: frozenset[DocKey],
) -> str | None:
    """The trigger that fires now ("interval" / "new_documents"), or None. Pure."""
    if not new_docs or new_docs <= last_attempted:
        return None  # nothing the last attempt did not already try
    if len(new_docs) >= ft.min_new_documents:
        return "new_documents"
    if ft.interval_s > 0 and now - last_run_at >= ft.interval_s:
        return "interval"
    return None


def unlearned_documents(cfg: KfreshConfig) -> frozenset[DocKey]:
    """Validated (selected) document versions that the served adapter's facts do not come from."""
    from kfresh.finetuner.registry import AdapterRegistry
    from kfresh.finetuner.selection import select_documents
    from kfresh.indexer.stores import store_exists

    if not store_exists(cfg.store):
        return frozenset()
    registry = AdapterRegistry(cfg.finetune.registry_dir)
    current = registry.current()
    learned: set[DocKey] = set()
    if current is not None:
        learned = set(registry.learned(current.version).items())
    selected = select_documents(cfg.finetune, cfg.store)
    return frozenset((d.doc_id, d.version) for d in selected.docs) - learned


Runner = Callable[[KfreshConfig, bool], Any]


def _count(outcome: DistillOutcome) -> None:
    from kfresh.core import metrics

    metrics.DISTILL_RUNS.labels(state=outcome.state.lower()).inc()
    for name, passed in outcome.checks.items():
        metrics.GATE_CHECKS.labels(check=name, passed=str(passed).lower()).inc()


def _run_in_worker(cfg: KfreshConfig, dry_run: bool) -> Any:
    from kfresh.finetuner.worker import run_distill_in_subprocess

    ft = cfg.finetune
    return run_distill_in_subprocess(
        cfg, dry_run=dry_run, nice=ft.worker_nice, torch_threads=ft.worker_threads or None,
        timeout_s=ft.time_budget_s * 3 + 600,  # training is capped at time_budget_s; evaluation and loading around it
    )  # fmt: skip


class DistillScheduler:
    """Owns the one distillation run a server may have in flight; `start()` adds the schedule if enabled."""

    def __init__(
        self,
        cfg: KfreshConfig,
        *,
        on_published: Callable[[], Awaitable[Any]] | None = None,
        runner: Runner = _run_in_worker,
    ) -> None:
        self._cfg = cfg
        self._on_published = on_published
        self._runner = runner
        self._current: asyncio.Task[DistillOutcome] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._last_run_at = time.time()
        self._last_attempted: frozenset[DocKey] = frozenset()
        self.last: DistillOutcome | None = None
        self.runs = 0

    @property
    def running(self) -> bool:
        return self._current is not None and not self._current.done()

    def start(self) -> None:
        ft = self._cfg.finetune
        if ft.auto and self._loop_task is None:
            log.info("distill.schedule interval_s=%s min_new_documents=%d", ft.interval_s, ft.min_new_documents)
            self._loop_task = asyncio.create_task(self._schedule(), name="kfresh-distill-schedule")

    async def close(self) -> None:
        """Stop the schedule; an in-flight run is cancelled (its worker process is killed, nothing is published)."""
        for task in (self._loop_task, self._current):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._loop_task = None

    async def request(self, *, dry_run: bool = False, wait: bool = False) -> DistillOutcome:
        """The Distill RPC. A dry run plans in a worker at once; a real run starts or joins the one in flight."""
        if dry_run:
            return await self._execute("request", dry_run=True)
        joined = self.running
        task = self._current if joined else self._begin("request")
        assert task is not None
        if wait:
            return await asyncio.shield(task)
        return DistillOutcome(state="RUNNING" if joined else "STARTED", trigger="request")

    def rebuild(self, trigger: str) -> bool:
        """Start a run now when the schedule is on and none is running (the served adapter was withdrawn: a
        replacement without the removed document should follow). True if one started."""
        if not self._cfg.finetune.auto or self.running:
            return False
        self._begin(trigger)
        return True

    def _begin(self, trigger: str) -> asyncio.Task[DistillOutcome]:
        self.runs += 1
        self._last_run_at = time.time()
        self._current = asyncio.create_task(self._execute(trigger, dry_run=False), name="kfresh-distill")
        return self._current

    async def _execute(self, trigger: str, *, dry_run: bool) -> DistillOutcome:
        started = time.perf_counter()
        log.info("distill.start trigger=%s dry_run=%s", trigger, dry_run)
        try:
            result = await asyncio.to_thread(self._runner, self._cfg, dry_run)
            outcome = DistillOutcome.from_result(result, trigger)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("distill.failed trigger=%s", trigger)
            outcome = DistillOutcome(state="FAILED", trigger=trigger, message=f"{type(exc).__name__}: {exc}")
        log.info("distill.end trigger=%s state=%s version=%s seconds=%.1f", trigger, outcome.state,
                 outcome.version or "-", time.perf_counter() - started)  # fmt: skip
        if not dry_run:
            self.last = outcome
            _count(outcome)
            if outcome.state == "PUBLISHED" and self._on_published is not None:
                await self._on_published()
        return outcome

    async def _schedule(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.finetune.check_every_s)
            if self.running:
                continue
            try:
                new_docs = await asyncio.to_thread(unlearned_documents, self._cfg)
            except Exception:
                log.exception("distill.schedule_check_failed")
                continue
            trigger = due(self._cfg.finetune, now=time.time(), last_run_at=self._last_run_at,
                          new_docs=new_docs, last_attempted=self._last_attempted)  # fmt: skip
            if trigger:
                self._last_attempted = new_docs
                self._begin(trigger)
