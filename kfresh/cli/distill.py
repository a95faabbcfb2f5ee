"""`kfresh distill`: distil validated knowledge into a gated adapter, here or on a server (the Distill RPC)."""

from __future__ import annotations

import argparse
from typing import Any

from kfresh.cli.common import (
    add_config_flags,
    client_options,
    config_from,
    message_dict,
    print_json,
    server_addr,
)


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil validated knowledge into a gated adapter; a running server picks a published one up live."""
    from kfresh.core.logs import setup_logging
    from kfresh.finetuner.worker import run_distill_in_subprocess

    if args.addr:
        return _distill_on_server(args)
    cfg = config_from(args)
    setup_logging(cfg.server.log_level, json_lines=cfg.server.log_json)
    result = run_distill_in_subprocess(
        cfg, dry_run=args.dry_run, questions_per_doc=args.questions, torch_threads=args.threads or None
    )
    summary: dict[str, Any] = {
        "status": result.status,
        "passed": result.passed,
        "new_facts": [f"{f.subject} | {f.relation} | {f.object}" for f in result.new_facts],
        "carried_facts": len(result.carried_facts),
        "excluded": [f"{e.fact.subject} | {e.fact.relation} | {e.fact.object}: {e.reason}" for e in result.excluded],
        "figures": result.figures,
        "report": str(result.report_path) if result.report_path else None,
        "published": result.manifest.version if result.manifest else None,
        "run_dir": str(result.run_dir),
        "transfer": result.transfer.to_dict() if result.transfer else None,
    }
    if args.json:
        print_json(summary)
        return 0
    print(f"status: {result.status}" + (f" -> published {summary['published']}" if summary["published"] else ""))
    print(f"new facts ({len(result.new_facts)}):")
    for line in summary["new_facts"]:
        print(f"  + {line}")
    for line in summary["excluded"]:
        print(f"  - {line}")
    for key, value in result.figures.items():
        print(f"  {key}: {value}")
    if summary["report"]:
        print(f"gate report: {summary['report']}")
    if result.transfer:
        print_transfer(result.transfer)
    return 0 if result.status in ("dry_run", "nothing_new", "published") else 3


def print_transfer(transfer: Any) -> None:
    """The template-free question/answer pairs of a dry run, per document, and why the others were dropped."""
    figures = transfer.figures()
    print(f"question pairs: {figures['pairs']} from {figures['documents_with_pairs']} of {figures['documents']} documents"
          f" ({figures['candidates']} candidates; dropped: {figures['dropped'] or 'none'})")  # fmt: skip
    for pair in transfer.pairs:
        print(f"  + [{pair.doc_id} v{pair.version}] {pair.question} -> {pair.answer}")
    for drop in transfer.dropped:
        print(f"  - [{drop.doc_id}] {drop.question} ({drop.span!r}: {drop.reason})")


def _distill_on_server(args: argparse.Namespace) -> int:
    """The Distill RPC: the server runs it in its own worker and serves a published adapter at once."""
    from kfresh.client import KfreshClient
    from kfresh.v1 import kfresh_pb2 as pb

    with KfreshClient(server_addr(args), **client_options()) as client:
        reply = client.distill(dry_run=args.dry_run, wait=args.wait or args.dry_run, timeout=args.timeout)
    state = pb.DistillResponse.State.Name(reply.state)
    if args.json:
        print_json(message_dict(reply))
    else:
        print(f"state: {state}" + (f" -> published {reply.version}" if reply.version else "")
              + (f" ({reply.message})" if reply.message else ""))  # fmt: skip
        if reply.facts:
            print(f"facts ({reply.new_facts} new, {reply.kept_facts} kept):")
            for sentence in reply.facts:
                print(f"  + {sentence}")
        for key, value in sorted(reply.figures.items()):
            print(f"  {key}: {value:g}")
        if reply.report_path:
            print(f"gate report (on the server): {reply.report_path}")
    return 3 if state in ("REJECTED", "FAILED") else 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "distill",
        help="distil validated knowledge into a gated LoRA adapter and publish it if it passes",
        description="Select validated documents from the store, extract facts, train a LoRA adapter, gate it, and "
        "publish it to the registry only if it passes (exit code 3 when the gate rejects it). "
        "A server running with --generation.enable_lora true picks a published adapter up without a restart.",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be learned, train nothing")
    p.add_argument(
        "--questions",
        type=int,
        default=None,
        metavar="N",
        help="questions without templates per document (default: finetune.questions_per_doc; 0 = template facts "
        "only): answer spans picked in code, answered by the base model reading the document, kept when grounded "
        "and stable, learned beside the template facts; --dry-run shows them",
    )
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = torch default)")
    p.add_argument(
        "--addr", help="ask the kfresh server at host:port to distil (the Distill RPC) instead of running here"
    )
    p.add_argument(
        "--wait", action="store_true", help="with --addr: wait for the outcome instead of returning once started"
    )
    p.add_argument("--timeout", type=float, default=None, help="with --addr: deadline in seconds")
    add_config_flags(p)
    p.set_defaults(func=cmd_distill)
