"""Command-line options for reaching kfresh (address, bearer token, TLS), shared by run.py and changes.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kfresh.client import KfreshClient, tls_credentials


def add_arguments(parser: argparse.ArgumentParser, *, addr_help: str) -> None:
    parser.add_argument("--kfresh-addr", metavar="HOST:PORT", help=addr_help)
    parser.add_argument("--token-file", type=Path, help="a file whose first line is kfresh's bearer token")
    parser.add_argument("--tls-ca", type=Path, help="TLS on: verify kfresh's certificate against this CA file")
    parser.add_argument("--tls-server-name", help="the name kfresh's certificate is checked against")


def token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return None
    try:
        return args.token_file.read_text(encoding="utf-8").splitlines()[0].strip() or None
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise SystemExit(f"--token-file {args.token_file}: cannot read a token ({exc.__class__.__name__})") from None


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """KfreshClient / AsyncKfreshClient keyword arguments from the options."""
    credentials = tls_credentials(ca_file=args.tls_ca) if args.tls_ca is not None else None
    return {"token": token(args), "credentials": credentials, "server_name": args.tls_server_name}


def blocking_client(addr: str, args: argparse.Namespace) -> KfreshClient:
    return KfreshClient(addr, **client_options(args))
