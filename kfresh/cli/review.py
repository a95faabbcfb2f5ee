"""`kfresh review`: the review queue of a running server (finetune.require_review: only approved items train)."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from kfresh.cli.common import client_options, client_parser, message_dict, print_json, server_addr


def cmd_review(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(server_addr(args), **client_options()) as client:
        if args.action in ("approve", "reject"):
            reply: Any = client.decide_review(args.ids, approve=args.action == "approve", reviewer=args.by,
                                              note=args.note, timeout=args.timeout)  # fmt: skip
        elif args.action == "show":
            reply = client.list_review(item=args.id, timeout=args.timeout)
        else:
            reply = client.list_review(state=args.state, limit=args.limit, timeout=args.timeout)
    if args.json:
        print_json(message_dict(reply))
        return 0
    for item in reply.items:
        print(item_line(item, full=args.action == "show"))
    if args.action == "list":
        counts = ", ".join(f"{n} {state}" for state, n in sorted(reply.counts.items()))
        required = "only approved items train" if reply.required else "finetune.require_review is off on this server"
        print(f"queue: {counts or 'empty'} ({required})")
    return 0


def item_line(item: Any, *, full: bool = False) -> str:
    flags = [f for f, on in (("wrong closed-book", item.base_wrong), (f"cited {item.cited}x", item.cited)) if on]
    decided = f"  by {item.decided_by}" + (f": {item.note}" if item.note else "") if item.decided_by else ""
    line = (f"#{item.id} [{item.state}] {item.doc_id} v{item.version} ({item.kind}): {item.question} -> {item.span}"
            f"{'  (' + ', '.join(flags) + ')' if flags else ''}{decided}")  # fmt: skip
    if full:
        line += f"\n  answer: {item.answer}\n  sentence: {item.sentence}"
    return line


def register(sub: Any) -> None:
    p = sub.add_parser(
        "review",
        help="list, show, approve or reject what distillation would learn (the review queue)",
        description="The review queue of a running server: with finetune.require_review, distillation runs (dry runs "
        "too) queue what they would learn and train only what a person approved. Pending items come first: those "
        "the base model answers wrong closed-book, then the most cited documents. Every decision is recorded with "
        "who made it and when (admin scope).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = client_parser(actions, "list", "the queue, pending items first", cmd_review)
    q.add_argument("--state", default="", choices=["", "pending", "approved", "rejected"], help="only this state")
    q.add_argument("--limit", type=int, default=50, help="at most this many items (0 = all)")
    q = client_parser(actions, "show", "one item with its answer and source sentence", cmd_review)
    q.add_argument("id", type=int)
    for action, verb in (("approve", "train on"), ("reject", "never train on")):
        q = client_parser(actions, action, f"{verb} the items with these ids", cmd_review)
        q.add_argument("ids", type=int, nargs="+", metavar="ID")
        q.add_argument(
            "--by", default=getpass.getuser(), help="reviewer name recorded with the decision (default: $USER)"
        )
        q.add_argument("--note", default="", help="why (recorded with the decision)")
