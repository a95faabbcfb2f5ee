"""`kfresh` command line, one module per command group:

- `serve`: serve (the gRPC server), consume (NATS JetStream -> a server);
- `client_commands`: ingest, ask, retrieve, delete, stats, adapters (against a running server);
- `distill`: distill (here, or on a server through the Distill RPC);
- `provision`: provision, demo, config;
- plugins: command groups other installed packages register under the entry-point group `kfresh.commands`
  (kfresh's own benchmark suites register `bench` there, so the CLI never imports the benchmarks and a
  broken plugin costs its own command, not `kfresh serve`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from kfresh.cli import client_commands, distill, provision, review, serve
from kfresh.core.config import ConfigError

PLUGIN_GROUP = "kfresh.commands"


def _register_plugins(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            entry.load()(sub)
        except Exception as exc:
            print(f"kfresh: command {entry.name!r} is unavailable ({entry.value}: {type(exc).__name__}: {exc})",
                  file=sys.stderr)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfresh",
        description="Keep an LLM's knowledge fresh: stream documents in, ask questions, get fresh cited answers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (serve, client_commands, distill, review, provision):
        group.register(sub)
    _register_plugins(sub)
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
    except Exception as exc:
        from kfresh.client.sources import SourceError

        if isinstance(exc, SourceError):
            print(f"kfresh: {exc}", file=sys.stderr)
            return 2
        raise
