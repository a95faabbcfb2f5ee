"""Change the shop's documents while the chat runs: a price change, a new returns policy that supersedes
the old one, a withdrawn product that is deleted (the files shop/1-*.jsonl, 2-*, 3-*, in order).

    python examples/chatbot/changes.py --kfresh-addr 127.0.0.1:50051 [--pause 20] [STEP ...]

STEP is a file's number or name (default: all three). Ask the chat again after each step: the answer
changes with no reload, and the knowledge panel shows the new version and its lag.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import connect

from kfresh.client import KfreshClient
from kfresh.client.sources import SourceError, read_source
from kfresh.v1 import kfresh_pb2 as pb

SHOP = Path(__file__).resolve().parent / "shop"
STEPS = sorted(SHOP.glob("[0-9]-*.jsonl"))


def find_step(name: str) -> Path:
    for path in STEPS:
        if name in (path.name, path.stem, path.stem.split("-", 1)[0]):
            return path
    raise SystemExit(f"no change step {name!r}; steps: {', '.join(p.stem for p in STEPS)}")


def apply(client: KfreshClient, path: Path) -> list[pb.IngestResponse]:
    """Send one step's changes; returns the acks (each durable before it is acknowledged)."""
    return list(client.ingest(read_source(str(path)), timeout=60))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    connect.add_arguments(parser, addr_help="kfresh's gRPC address (default 127.0.0.1:50051)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait between steps (default 0)")
    parser.add_argument("steps", nargs="*", help="which steps (default: all, in order)")
    args = parser.parse_args(argv)
    steps = [find_step(s) for s in args.steps] if args.steps else STEPS
    with connect.blocking_client(args.kfresh_addr or "127.0.0.1:50051", args) as client:
        for i, path in enumerate(steps):
            if i and args.pause:
                time.sleep(args.pause)
            try:
                acks = apply(client, path)
            except SourceError as exc:
                print(f"changes: {exc}", file=sys.stderr)
                return 2
            for ack in acks:
                status = pb.AckStatus.Name(ack.status).removeprefix("ACK_STATUS_").lower()
                print(f"{path.stem}: {ack.id} version {ack.version} {status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
