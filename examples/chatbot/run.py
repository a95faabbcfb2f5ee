"""Start the customer-service chat: a kfresh server, the shop's documents, the web app. `make chatbot`.

    python examples/chatbot/run.py                 # its own kfresh server (embedded defaults), port 8080
    python examples/chatbot/run.py --kfresh-addr 127.0.0.1:50051 --token-file token   # an existing server

Without --kfresh-addr it starts `kfresh serve` (which converts the packaged model on its first start) with its data in a
temporary folder and `answer.min_score` 0.38 (a shop assistant should say it does not know rather than
answer a stove question from the tent price list), loads shop/documents.jsonl, then serves the page and
prints its URL. Ctrl-C stops everything. `--feedback` prints the stored answers and votes and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import connect
import grpc

HERE = Path(__file__).resolve().parent
DOCUMENTS = HERE / "shop" / "documents.jsonl"
# Passages scoring below this are not shown to the model; with none left the answer says the documents do not
# say (kfresh's default, 0.2, suits open questions over news; shop/*.jsonl scores measured in the README).
MIN_SCORE = 0.38


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="where the web app listens (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="the web app's port (default 8080; 0 = any free)")
    connect.add_arguments(parser, addr_help="use this kfresh server instead of starting one")
    parser.add_argument("--no-documents", action="store_true", help="do not load shop/documents.jsonl")
    parser.add_argument("--data", type=Path, default=Path(".kfresh/chatbot"), help="where votes are kept")
    parser.add_argument("--feedback", action="store_true", help="print the stored answers and votes, then exit")
    return parser.parse_args(argv)


@contextlib.contextmanager
def kfresh(args: argparse.Namespace) -> Iterator[str]:
    """The address of a ready kfresh server: the one given, or one started here for as long as the block runs."""
    if args.kfresh_addr:
        yield args.kfresh_addr
        return
    from kfresh.core.config import load_config
    from kfresh.testing.servers import kfresh_server

    cfg = load_config()  # the server converts the packaged model on its first start (`make models` did already)
    print("chatbot: starting kfresh serve (the vLLM engine takes ~30-60 s on 2 CPU cores)...", flush=True)
    settings = {"answer.min_score": MIN_SCORE, "models.cache_dir": cfg.models.cache_dir.resolve(),
                "server.log_level": "INFO"}  # fmt: skip
    with kfresh_server(settings, model=True, timeout_s=600) as target:
        print(f"chatbot: kfresh ready at {target.addr} in {target.ready_s:.1f} s (log {target.log})", flush=True)
        yield target.addr


def load_documents(addr: str, args: argparse.Namespace) -> None:
    from kfresh.client.sources import read_source

    with connect.blocking_client(addr, args) as client:
        client.wait_ready(timeout=600)
        acks = list(client.ingest(read_source(str(DOCUMENTS)), timeout=60))
        client.wait_searchable(30)
    print(f"chatbot: {len(acks)} shop documents loaded and searchable", flush=True)


def serve(addr: str, args: argparse.Namespace) -> None:
    import uvicorn
    from app import Settings, create_app

    settings = Settings(
        kfresh_addr=addr, token=connect.client_options(args)["token"], tls_ca_file=args.tls_ca, tls_server_name=args.tls_server_name,
        feedback_db=args.data / "feedback.db",
    )  # fmt: skip
    # Open knowledge streams (server-sent events) never end by themselves: on Ctrl-C/SIGTERM they get 3 s.
    config = uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"chatbot: open http://{args.host}:{port}/  (Ctrl-C stops)", flush=True)
        await task

    asyncio.run(main())


def print_feedback(args: argparse.Namespace) -> int:
    from feedback import FeedbackStore

    store = FeedbackStore(args.data / "feedback.db")
    for row in store.rows():
        cited = ", ".join(f"{c['doc_id']} v{c['version']}" for c in row["details"]["citations"]) or "none"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["asked_at"]))
        print(json.dumps({"at": when, "vote": row["vote"], "question": row["question"], "answer": row["answer"],
                          "cited": cited}, ensure_ascii=False))  # fmt: skip
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the kfresh server started here is stopped too (uvicorn re-raises the
    # signal after its own graceful shutdown; the default action would end this process and orphan the server).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.feedback:
        return print_feedback(args)
    try:
        with kfresh(args) as addr:
            if not args.no_documents:
                load_documents(addr, args)
            serve(addr, args)
    except grpc.RpcError as exc:
        print(f"chatbot: kfresh at {args.kfresh_addr or 'the started server'}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
