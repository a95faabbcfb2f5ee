"""`kfresh` command line: serve, ingest, ask, retrieve, delete, stats, adapters, demo, provision, config."""
from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from kfresh.config import ConfigError, KfreshConfig, load_config

ADDR_HELP = "server address host:port (default 127.0.0.1:50051, or $KFRESH_ADDR)"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--section.field` flag per setting, with the field's description as help."""
    for section, info in KfreshConfig.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        group = parser.add_argument_group(f"{section} settings (also KFRESH_{section.upper()}__FIELD or [{section}] in kfresh.toml)")
        for name, field in model.model_fields.items():
            choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
            is_list = typing.get_origin(field.annotation) is list
            default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
            group.add_argument(
                f"--{section}.{name}",
                dest=f"cfg:{section}.{name}",
                metavar=name.upper() if not choices else None,
                choices=choices,
                default=None,
                type=_comma_list if is_list else None,
                help=f"{field.description}{' (comma-separated)' if is_list else ''} [default: {default}]",
            )


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _config_from(args: argparse.Namespace) -> KfreshConfig:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return load_config(overrides)


def _addr(args: argparse.Namespace) -> str:
    import os

    return args.addr or os.environ.get("KFRESH_ADDR", "127.0.0.1:50051")


def _client_options() -> dict[str, Any]:
    """Token and TLS for client commands, from the `client` settings (KFRESH_CLIENT__* or [client] in kfresh.toml)."""
    from kfresh.client import connect_options

    return connect_options(load_config().client)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=None))


def _message_dict(msg: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from kfresh.logs import setup_logging
    from kfresh.server.app import serve

    cfg = _config_from(args)
    setup_logging(cfg.server.log_level, json_lines=cfg.server.log_json)
    asyncio.run(serve(cfg))
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    """NATS JetStream -> kfresh, until SIGTERM/SIGINT (or --idle-exit seconds without messages)."""
    import asyncio
    import signal

    from kfresh.client import connect_options
    from kfresh.logs import setup_logging
    from kfresh.nats_ingest import NatsIngestor

    cfg = _config_from(args)
    setup_logging(cfg.server.log_level, json_lines=cfg.server.log_json)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with NatsIngestor(cfg.nats, addr=_addr(args), client_options=connect_options(cfg.client)) as consumer:
            stats = await consumer.run(stop=stop, idle_exit_s=args.idle_exit)
        return {"acked": dict(stats.acked), "dead_letters": stats.dead, "retried": stats.retried}

    _print_json(asyncio.run(main()))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kfresh.client import KfreshClient
    from kfresh.sources import count_records, read_source
    from kfresh.v1 import kfresh_pb2 as pb

    counts: dict[str, int] = {}
    with KfreshClient(_addr(args), **_client_options()) as client:
        acks = client.ingest(read_source(args.source))
        bar = tqdm(acks, total=count_records(args.source), unit="doc", disable=args.json or args.quiet, file=sys.stderr)
        for ack in bar:
            status = pb.AckStatus.Name(ack.status)
            counts[status] = counts.get(status, 0) + 1
            if args.json:
                _print_json(_message_dict(ack))
        waited = client.wait_searchable(args.wait) if args.wait > 0 else None
    if not args.json:
        print("acknowledged: " + ", ".join(f"{k.removeprefix('ACK_STATUS_').lower()}={v}" for k, v in sorted(counts.items())))
        if waited is not None:
            print(f"searchable: {'yes' if waited.searchable else 'not yet'} after {waited.waited_ms / 1000:.2f} s")
    return 4 if waited is not None and not waited.searchable else 0


def _print_citations(done: Any) -> None:
    from kfresh.server.prompting import format_date

    for c in done.citations:
        mark = "*" if c.primary else " "
        when = format_date(c.valid_from.seconds + c.valid_from.nanos / 1e9)
        print(f" {mark}[{c.index}] {c.doc_id} v{c.version}  {c.source or '-'}  {when}  score={c.score:.2f}")
    for c in done.superseded:
        print(f"   (superseded) {c.doc_id} v{c.version}  {c.source or '-'}")
    t = done.timings
    adapter = f", adapter {done.adapter}" if done.adapter else ""
    print(f"   retrieval {t.retrieval_ms:.0f} ms, first token {t.time_to_first_token_ms:.0f} ms, total {t.total_ms:.0f} ms, {done.output_tokens} tokens{adapter}")


def cmd_ask(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    options = {
        "k": args.k, "closed_book": args.closed_book, "max_tokens": args.max_tokens, "filter": _filters(args.filter),
        "adapter": args.adapter,
    }  # fmt: skip
    with KfreshClient(_addr(args), **_client_options()) as client:
        text = []
        for event in client.answer(args.question, timeout=args.timeout, **options):
            if event.HasField("done"):
                if args.json:
                    _print_json({"answer": "".join(text), **_message_dict(event.done)})
                else:
                    print()
                    _print_citations(event.done)
            else:
                text.append(event.delta)
                if not args.json:
                    print(event.delta, end="", flush=True)
    return 0


def _filters(pairs: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--filter expects key=value, got {pair!r}")
        out[key] = value
    return out


def cmd_retrieve(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(_addr(args), **_client_options()) as client:
        reply = client.retrieve(args.query, k=args.k, filter=_filters(args.filter), timeout=args.timeout)
    if args.json:
        _print_json(_message_dict(reply))
        return 0
    for c in reply.chunks:
        snippet = c.text.replace("\n", " ")[:100]
        print(f"{c.score:.3f}  {c.doc_id} v{c.version}#{c.ordinal}  {snippet}")
    print(f"({len(reply.chunks)} chunks in {reply.retrieval_ms:.1f} ms)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(_addr(args), **_client_options()) as client:
        reply = client.delete(args.id, timeout=args.timeout)
    if args.json:
        _print_json(_message_dict(reply))
    else:
        print(f"deleted {reply.id} (version {reply.version})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(_addr(args), **_client_options()) as client:
        reply = client.stats(timeout=args.timeout)
    data = _message_dict(reply)
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return 0


def _adapter_line(a: Any) -> str:
    from kfresh.server.prompting import format_date

    flags = ", ".join(f for f, on in (("current", a.current), ("standby", a.standby), ("loaded", a.loaded)) if on)
    created = format_date(a.created_at.seconds + a.created_at.nanos / 1e9)
    mark = "*" if a.current else " "
    return f"{mark} {a.version}  parent {a.parent or '-'}  {a.facts} facts  {created}  {flags or '-'}"


def cmd_adapters(args: argparse.Namespace) -> int:
    from kfresh.client import KfreshClient

    with KfreshClient(_addr(args), **_client_options()) as client:
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
        _print_json(_message_dict(reply))
    elif args.action == "list":
        for adapter in reply.adapters:
            print(_adapter_line(adapter))
        state = "" if reply.enabled else " (LoRA is off on this server: --generation.enable_lora true)"
        print(f"serving: {reply.current or 'base model'}{state}")
    elif args.action == "show":
        print(json.dumps(_message_dict(reply), indent=2, ensure_ascii=False))
    else:
        print(f"serving {reply.current or 'the base model'} (was {reply.previous or 'the base model'})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kfresh.demo import run_demo

    return run_demo(_config_from(args), keep=args.keep)


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil validated knowledge into a gated adapter; a running server picks a published one up live."""
    from kfresh.finetuner.worker import run_distill_in_subprocess
    from kfresh.logs import setup_logging

    if args.addr:
        return _distill_on_server(args)
    cfg = _config_from(args)
    setup_logging(cfg.server.log_level, json_lines=cfg.server.log_json)
    result = run_distill_in_subprocess(cfg, dry_run=args.dry_run, torch_threads=args.threads or None)
    summary = {
        "status": result.status,
        "passed": result.passed,
        "new_facts": [f"{f.subject} | {f.relation} | {f.object}" for f in result.new_facts],
        "carried_facts": len(result.carried_facts),
        "excluded": [f"{e.fact.subject} | {e.fact.relation} | {e.fact.object}: {e.reason}" for e in result.excluded],
        "figures": result.figures,
        "report": str(result.report_path) if result.report_path else None,
        "published": result.manifest.version if result.manifest else None,
        "run_dir": str(result.run_dir),
    }
    if args.json:
        _print_json(summary)
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
    return 0 if result.status in ("dry_run", "nothing_new", "published") else 3


def _distill_on_server(args: argparse.Namespace) -> int:
    """The Distill RPC: the server runs it in its own worker and serves a published adapter at once."""
    from kfresh.client import KfreshClient
    from kfresh.v1 import kfresh_pb2 as pb

    with KfreshClient(_addr(args), **_client_options()) as client:
        reply = client.distill(dry_run=args.dry_run, wait=args.wait or args.dry_run, timeout=args.timeout)
    state = pb.DistillResponse.State.Name(reply.state)
    if args.json:
        _print_json(_message_dict(reply))
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


def cmd_provision(args: argparse.Namespace) -> int:
    from kfresh.logs import setup_logging
    from kfresh.models import provision

    setup_logging("INFO")
    result = provision(_config_from(args))
    _print_json({k: str(v) for k, v in result.items()})
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(_config_from(args).model_dump_json(indent=2))
    return 0


def _client_parser(sub: Any, name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--addr", help=ADDR_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.set_defaults(func=func)
    return p


def _register_bench(sub: Any) -> None:
    """`kfresh bench SUITE`: the logic lives in benchmarks/cli.py (package kfresh.benchmarks)."""
    from kfresh.benchmarks.cli import register

    register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfresh",
        description="Keep an LLM's knowledge fresh: stream documents in, ask questions, get fresh cited answers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gRPC server (index + model)", description="Run the kfresh gRPC server until SIGTERM/SIGINT.")
    _add_config_flags(p)
    p.set_defaults(func=cmd_serve)

    p = _client_parser(sub, "ingest", "stream documents to the server (JSONL file, '-' for stdin, or a folder of .md/.txt)", cmd_ingest)
    p.add_argument("source", help="JSONL file, '-' (stdin) or a folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="after the last ack, wait up to SECONDS until everything is searchable (exit 4 if not)")

    p = sub.add_parser(
        "consume",
        help="stream documents from a NATS JetStream subject into the server (at-least-once, idempotent)",
        description="Consume document messages (JSON objects like `kfresh ingest` JSONL lines) from a durable NATS "
        "JetStream pull consumer and send them to the kfresh server at --addr. A message is acknowledged to NATS only "
        "after kfresh stored it durably; messages kfresh can never accept go to --nats.dead_letter_subject.",
    )
    p.add_argument("--addr", help=ADDR_HELP)
    p.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="exit after this long without messages")
    _add_config_flags(p)
    p.set_defaults(func=cmd_consume)

    p = _client_parser(sub, "ask", "ask a question; streams the answer, then its citations", cmd_ask)
    p.add_argument("question")
    p.add_argument("--k", type=int, default=0, help="passages to retrieve (0 = server default)")
    p.add_argument("--closed-book", action="store_true", help="answer from the model's weights only")
    p.add_argument("--max-tokens", type=int, default=0, help="answer length (0 = server default)")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata filter (repeatable)")
    p.add_argument("--adapter", default="", help="adapter version (e.g. v0003), 'none' for the base model; default: the served one")

    p = _client_parser(sub, "retrieve", "show the chunks a query retrieves", cmd_retrieve)
    p.add_argument("query")
    p.add_argument("--k", type=int, default=0, help="chunks to return (0 = server default)")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata filter (repeatable)")

    p = _client_parser(sub, "delete", "delete a document by id", cmd_delete)
    p.add_argument("id")

    _client_parser(sub, "stats", "counters, freshness lag percentiles, model and adapter in use", cmd_stats)

    p = sub.add_parser("adapters", help="list, show, promote or roll back LoRA adapter versions", description="Manage the LoRA adapters a running server serves (its finetune.registry_dir).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _client_parser(actions, "list", "adapter versions; * marks the served one", cmd_adapters)
    p = _client_parser(actions, "show", "one version's manifest: hashes, parent, gate metrics", cmd_adapters)
    p.add_argument("version", help="e.g. v0003")
    p = _client_parser(actions, "promote", "serve VERSION for new requests (in-flight ones finish on theirs)", cmd_adapters)
    p.add_argument("version", help="e.g. v0003")
    _client_parser(actions, "rollback", "serve the previously served version again (instant)", cmd_adapters)

    p = sub.add_parser("demo", help="start a server, stream a changing corpus, ask before/after a correction", description="End-to-end demo on the shipped sample corpus, in a temporary data folder.")
    p.add_argument("--keep", action="store_true", help="keep the temporary data folder and server log")
    _add_config_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "distill",
        help="distil validated knowledge into a gated LoRA adapter and publish it if it passes",
        description="Select validated documents from the store, extract facts, train a LoRA adapter, gate it, and "
        "publish it to the registry only if it passes (exit code 3 when the gate rejects it). "
        "A server running with --generation.enable_lora true picks a published adapter up without a restart.",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be learned, train nothing")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = torch default)")
    p.add_argument("--addr", help="ask the kfresh server at host:port to distil (the Distill RPC) instead of running here")
    p.add_argument("--wait", action="store_true", help="with --addr: wait for the outcome instead of returning once started")
    p.add_argument("--timeout", type=float, default=None, help="with --addr: deadline in seconds")
    _add_config_flags(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("provision", help="prepare the models (convert the packaged GGUF once)", description="Resolve the embedder and convert the generator into a local Hugging Face folder (cached).")
    _add_config_flags(p)
    p.set_defaults(func=cmd_provision)

    _register_bench(sub)

    p = sub.add_parser("config", help="print the effective configuration as JSON", description="Print the configuration after defaults, kfresh.toml, KFRESH_* and flags.")
    _add_config_flags(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"kfresh: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "?"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"kfresh: {code}: {details}", file=sys.stderr)
        if code == "UNAVAILABLE":
            print("  is the server running? start it with `kfresh serve` or pass --addr", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - CLI edge: a clear message, not a traceback
        from kfresh.sources import SourceError

        if isinstance(exc, SourceError):
            print(f"kfresh: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
