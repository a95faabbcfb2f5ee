"""Client commands: ingest, ask, explain, replay, retrieve, delete, stats, watch, adapters (a running server at --addr)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kfresh.cli.common import (
    add_filter_flags,
    client_options,
    client_parser,
    message_dict,
    parse_filters,
    parse_times,
    parse_where,
    print_json,
    server_addr,
)
from kfresh.cli.render import adapter_line, print_citations, print_logged_answer


def cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kfresh.client import KfreshClient
    from kfresh.client.sources import Source
    from kfresh.v1 import kfresh_pb2 as pb

    source = Source(args.source)
    valid, problems = source.check()  # the whole source, before anything is sent
    for problem in problems:
        print(f"kfresh: {problem}", file=sys.stderr)
    if problems and (not args.skip_invalid or not valid):
        what = "nothing valid to ingest" if args.skip_invalid else "nothing was ingested"
        print(f"kfresh: {len(problems)} invalid record(s) in {args.source}; {what}"
              + ("" if args.skip_invalid else " (--skip-invalid ingests the valid ones)"), file=sys.stderr)  # fmt: skip
        return 2
    counts: dict[str, int] = {}
    with KfreshClient(server_addr(args), **client_options()) as client:
        acks = client.ingest(source.requests())
        bar = tqdm(acks, total=valid, unit="doc", disable=args.json or args.quiet, file=sys.stderr)
        for ack in bar:
            status = pb.AckStatus.Name(ack.status)
            counts[status] = counts.get(status, 0) + 1
            if args.json:
                print_json(message_dict(ack))
        waited = client.wait_searchable(args.wait) if args.wait > 0 else None
    if not args.json:
        print(
            "acknowledged: "
            + ", ".join(f"{k.removeprefix('ACK_STATUS_').lower()}={v}" for k, v in sorted(counts.items()))
            + (f"; skipped {len(problems)} invalid record(s), listed above" if problems else "")
        )
        if waited is not None:
            print(f"searchable: {'yes' if waited.searchable else 'not yet'} after {waited.waited_ms / 1000:.2f} s")
    return 4 if waited is not None and not waited.searchable else 0


def cmd_ask(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    options = {
        "k": args.k, "closed_book": args.closed_book, "max_tokens": args.max_tokens, "filter": parse_filters(args.filter),
        "adapter": args.adapter, "where": parse_where(args), **parse_times(args),
    }  # fmt: skip
    with KfreshClient(server_addr(args), **client_options()) as client:
        text: list[str] = []
        for event in client.answer(args.question, timeout=args.timeout, **options):
            if event.HasField("done"):
                if args.json:
                    print_json({"answer": "".join(text), **message_dict(event.done)})
                else:
                    print()
                    print_citations(event.done)
            else:
                text.append(event.delta)
                if not args.json:
                    print(event.delta, end="", flush=True)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(server_addr(args), **client_options()) as client:
        logged = client.get_answer(args.id, timeout=args.timeout)
    if args.json:
        print_json(message_dict(logged))
    else:
        print_logged_answer(logged)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(server_addr(args), **client_options()) as client:
        original = client.get_answer(args.id, timeout=args.timeout)
        if not args.json:
            print(f"original ({original.adapter or 'base model'}, passages "
                  + (", ".join(f"{c.doc_id} v{c.version}" for c in original.citations) or "none") + "):")  # fmt: skip
            print(original.answer)
            print("replayed:")
        text: list[str] = []
        done = None
        for event in client.replay_answer(args.id, timeout=args.timeout):
            if event.HasField("done"):
                done = event.done
            else:
                text.append(event.delta)
                if not args.json:
                    print(event.delta, end="", flush=True)
    replayed = "".join(text)
    same = replayed == original.answer
    if args.json:
        print_json({"same": same, "original": message_dict(original), "answer": replayed,
                    **({"done": message_dict(done)} if done is not None else {})})  # fmt: skip
    else:
        print()
        if done is not None:
            print_citations(done)
        print("same answer" if same else "a different answer")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(server_addr(args), **client_options()) as client:
        times = parse_times(args)
        reply = client.retrieve(
            args.query, k=args.k, filter=parse_filters(args.filter), where=parse_where(args), timeout=args.timeout,
            as_of=times.get("as_of"), valid_at=times.get("valid_at"),
        )  # fmt: skip
    if args.json:
        print_json(message_dict(reply))
        return 0
    for c in reply.chunks:
        snippet = c.text.replace("\n", " ")[:100]
        print(f"{c.score:.3f}  {c.doc_id} v{c.version}#{c.ordinal}  {snippet}")
    every = "; that is every chunk that matches" if reply.all_matches else ""
    print(f"({len(reply.chunks)} chunks in {reply.retrieval_ms:.1f} ms{every})")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(server_addr(args), **client_options()) as client:
        reply = (
            client.purge(args.id, timeout=args.timeout) if args.purge else client.delete(args.id, timeout=args.timeout)
        )
    if args.json:
        print_json(message_dict(reply))
    elif args.purge:
        when = f"deleted as version {reply.version}" if reply.version else "already deleted"
        snapshot = "a new index snapshot is written" if reply.snapshot_written else "the next index snapshot drops it"
        print(f"purged {reply.id} ({when}): erased {reply.versions} version rows, {reply.chunks} chunks, "
              f"{reply.citations} citations, {reply.answers} logged answers, {reply.review_items} review items; "
              f"{snapshot}")  # fmt: skip
    else:
        print(f"deleted {reply.id} (version {reply.version})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(server_addr(args), **client_options()) as client:
        reply = client.stats(timeout=args.timeout)
    data = message_dict(reply)
    if args.json:
        print_json(data)
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient
    from kfresh.core.time import format_iso, from_timestamp

    with KfreshClient(server_addr(args), **client_options()) as client:
        stream = client.watch(after_seq=args.after_seq, from_now=args.from_now, timeout=args.timeout)
        for n, change in enumerate(stream, start=1):
            if args.json:
                print_json(message_dict(change))
            else:
                where = f"  {change.source}" if change.source else ""
                print(f"{change.seq:>8}  {change.op:<6} {change.id} v{change.version}  searchable "
                      f"{change.lag_ms:.0f} ms after ack (acked {format_iso(from_timestamp(change.acked_at))}){where}", flush=True)  # fmt: skip
            if args.count and n >= args.count:
                break  # closing the client cancels the stream
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(server_addr(args), **client_options()) as client:
        if args.action == "list":
            reply = client.list_adapters(timeout=args.timeout)
        elif args.action == "show":
            listing = client.list_adapters(timeout=args.timeout)
            found = [a for a in listing.adapters if a.version == args.version.removeprefix("kfresh-")]
            if not found:
                print(f"kfresh: NOT_FOUND: adapter {args.version!r} is not in the server's registry", file=sys.stderr)
                return 1
            reply = found[0]
        elif args.action == "promote":
            reply = client.promote_adapter(args.version, timeout=args.timeout)
        else:
            reply = client.rollback_adapter(timeout=args.timeout)
    if args.json:
        print_json(message_dict(reply))
    elif args.action == "list":
        for adapter in reply.adapters:
            print(adapter_line(adapter))
        state = "" if reply.enabled else " (LoRA is off on this server: --generation.enable_lora true)"
        print(f"serving: {reply.current or 'base model'}{state}")
    elif args.action == "show":
        print(json.dumps(message_dict(reply), indent=2, ensure_ascii=False))
    else:
        print(f"serving {reply.current or 'the base model'} (was {reply.previous or 'the base model'})")
    return 0


def register(sub: Any) -> None:
    p = client_parser(
        sub, "ingest", "stream documents to the server (JSONL file, '-' for stdin, or a folder of .md/.txt)", cmd_ingest
    )
    p.add_argument("source", help="JSONL file, '-' (stdin) or a folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="ingest the valid records and list the invalid ones (default: any invalid record = nothing sent, exit 2)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the last ack, wait up to SECONDS until everything is searchable (exit 4 if not)",
    )

    p = client_parser(sub, "ask", "ask a question; streams the answer, then its citations", cmd_ask)
    p.add_argument("question")
    p.add_argument("--k", type=int, default=0, help="passages to retrieve (0 = server default)")
    p.add_argument("--closed-book", action="store_true", help="answer from the model's weights only")
    p.add_argument("--max-tokens", type=int, default=0, help="answer length (0 = server default)")
    add_filter_flags(p)
    p.add_argument(
        "--adapter", default="", help="adapter version (e.g. v0003), 'none' for the base model; default: the served one"
    )

    p = client_parser(
        sub, "explain", "show a logged answer: question, passages shown (versions, text), adapter, answer, timings "
        "(admin; the id is the answer_id `kfresh ask --json` prints)", cmd_explain,
    )  # fmt: skip
    p.add_argument("id", help="answer id, e.g. answer-3f2a...")
    p = client_parser(
        sub, "replay", "ask a logged answer again with the same passages and adapter version, and say whether the "
        "answer is the same (admin)", cmd_replay,
    )  # fmt: skip
    p.add_argument("id", help="answer id, e.g. answer-3f2a...")

    p = client_parser(sub, "retrieve", "show the chunks a query retrieves", cmd_retrieve)
    p.add_argument("query")
    p.add_argument("--k", type=int, default=0, help="chunks to return (0 = server default)")
    add_filter_flags(p)

    p = client_parser(sub, "delete", "delete a document by id", cmd_delete)
    p.add_argument("id")
    p.add_argument(
        "--purge",
        action="store_true",
        help="erase it (admin): every version's text and chunks, its vectors (a new snapshot), citations, the logged "
        "answers that showed it and its review items. A plain delete keeps the last text as a tombstone",
    )

    client_parser(sub, "stats", "counters, freshness lag percentiles, model and adapter in use", cmd_stats)

    p = client_parser(
        sub, "watch", "print each document change once it is searchable, with its lag (the change log, then live)",
        cmd_watch,
    )  # fmt: skip
    start = p.add_mutually_exclusive_group()
    start.add_argument("--after-seq", type=int, default=0, metavar="SEQ", help="changes after SEQ (default 0: all)")
    start.add_argument("--from-now", action="store_true", help="only changes acknowledged from now on")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N changes (default: run until Ctrl-C)")

    p = sub.add_parser(
        "adapters",
        help="list, show, promote or roll back LoRA adapter versions",
        description="Manage the LoRA adapters a running server serves (its finetune.registry_dir).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    client_parser(actions, "list", "adapter versions; * marks the served one", cmd_adapters)
    p = client_parser(actions, "show", "one version's manifest: hashes, parent, gate metrics", cmd_adapters)
    p.add_argument("version", help="e.g. v0003")
    p = client_parser(
        actions, "promote", "serve VERSION for new requests (in-flight ones finish on theirs)", cmd_adapters
    )
    p.add_argument("version", help="e.g. v0003")
    client_parser(actions, "rollback", "serve the previously served version again (instant)", cmd_adapters)
