"""Process commands: serve (the gRPC server) and consume (NATS JetStream -> a server)."""

from __future__ import annotations

import argparse
from typing import Any

from kfresh.cli.common import (
    ADDR_HELP,
    add_config_flags,
    config_from,
    print_json,
    server_addr,
)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from kfresh.core.logs import setup_logging
    from kfresh.server.app import serve

    cfg = config_from(args)
    setup_logging(cfg.server.log_level, json_lines=cfg.server.log_json)
    asyncio.run(serve(cfg))
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    """NATS JetStream -> kfresh, until SIGTERM/SIGINT (or --idle-exit seconds without messages)."""
    import asyncio
    import signal

    from kfresh.client import connect_options
    from kfresh.client.nats_ingest import NatsIngestor
    from kfresh.core.logs import setup_logging

    cfg = config_from(args)
    setup_logging(cfg.server.log_level, json_lines=cfg.server.log_json)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with NatsIngestor(
            cfg.nats, addr=server_addr(args), client_options=connect_options(cfg.client)
        ) as consumer:
            stats = await consumer.run(stop=stop, idle_exit_s=args.idle_exit)
        return {"acked": dict(stats.acked), "dead_letters": stats.dead, "retried": stats.retried}

    print_json(asyncio.run(main()))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC server (index + model)",
        description="Run the kfresh gRPC server until SIGTERM/SIGINT.",
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "consume",
        help="stream documents from a NATS JetStream subject into the server (at-least-once, idempotent)",
        description="Consume document messages (JSON objects like `kfresh ingest` JSONL lines) from a durable NATS "
        "JetStream pull consumer and send them to the kfresh server at --addr. A message is acknowledged to NATS only "
        "after kfresh stored it durably; messages kfresh can never accept go to --nats.dead_letter_subject.",
    )
    p.add_argument("--addr", help=ADDR_HELP)
    p.add_argument(
        "--idle-exit", type=float, default=None, metavar="SECONDS", help="exit after this long without messages"
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_consume)
