"""Run a distillation in a separate, lower-priority process, so training never shares the server's GIL.

Spawned (not forked): the server process holds threads, an asyncio loop and possibly a vLLM engine,
none of which survive a fork. The child lowers its own CPU priority (`nice`) so that on a small box
answers keep their latency while training uses the cycles they leave.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from multiprocessing.connection import Connection
from typing import Any

from kfresh.core.config import KfreshConfig
from kfresh.finetuner.distill import DistillResult, run_distill
from kfresh.finetuner.facts import Fact

log = logging.getLogger("kfresh.finetuner")


class DistillWorkerError(RuntimeError):
    """The distillation process failed or died; the message carries its error."""


def run_distill_in_subprocess(
    cfg: KfreshConfig,
    *,
    dry_run: bool = False,
    questions_per_doc: int | None = None,
    facts_override: list[Fact] | None = None,
    nice: int = 10,
    torch_threads: int | None = None,
    timeout_s: float | None = None,
) -> DistillResult:
    """`run_distill` in a spawned child process; blocks until it returns (run it in a thread from asyncio).

    `torch_threads=1` is the safe choice on a 2-core box that also serves: with two OpenMP threads and
    the other core busy, torch's element-wise ops were measured up to 100x slower (threads wait at
    barriers for a descheduled peer), while one thread degrades gracefully.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    facts = [f.to_dict() for f in facts_override] if facts_override is not None else None
    proc = ctx.Process(
        target=_child,
        args=(send, cfg.model_dump(mode="json"), dry_run, facts, nice, torch_threads, questions_per_doc),
        name="kfresh-distill",
    )
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            proc.kill()
            raise TimeoutError(f"distillation did not finish within {timeout_s} s")
        try:
            kind, payload = receive.recv()
        except EOFError:
            proc.join(10)
            raise DistillWorkerError(f"distillation process died (exit code {proc.exitcode})") from None
        if kind == "error":
            raise DistillWorkerError(str(payload))
        return payload
    finally:
        receive.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)


def _child(
    send: Connection, cfg_data: dict[str, Any], dry_run: bool, facts: list[dict[str, Any]] | None, nice: int,
    threads: int | None, questions_per_doc: int | None = None,
) -> None:  # fmt: skip
    try:
        if nice:
            os.nice(nice)
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch is imported in this process
        cfg = KfreshConfig.model_validate(cfg_data)
        override = [Fact.from_dict(f) for f in facts] if facts is not None else None
        result = run_distill(cfg, dry_run=dry_run, facts_override=override, questions_per_doc=questions_per_doc)
        send.send(("ok", result))
    except BaseException as exc:  # reported to the parent, which raises it
        log.exception("distill worker failed")
        send.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        send.close()
