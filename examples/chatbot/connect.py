"""Command-line options for reaching kfresh (address, bearer token, TLS), shared by run.py and changes.py.
They become kfresh's own `client` settings, read by `kfresh.client.connect_options` as the CLI reads them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kfresh.client import KfreshClient, connect_options
from kfresh.core.config import ClientConfig, ConfigError


def add_arguments(parser: argparse.ArgumentParser, *, addr_help: str) -> None:
    parser.add_argument("--kfresh-addr", metavar="HOST:PORT", help=addr_help)
    parser.add_argument("--token-file", type=Path, help="a file whose first line is kfresh's bearer token")
    parser.add_argument("--tls-ca", type=Path, help="TLS on: verify kfresh's certificate against this CA file")
    parser.add_argument("--tls-server-name", help="the name kfresh's certificate is checked against")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """KfreshClient / AsyncKfreshClient keyword arguments (token, credentials, server_name) from the options."""
    cfg = ClientConfig(token_file=args.token_file, tls_ca_file=args.tls_ca, tls_server_name=args.tls_server_name or "")
    try:
        return connect_options(cfg)
    except ConfigError as exc:
        raise SystemExit(f"chatbot: {exc}") from None


def blocking_client(addr: str, args: argparse.Namespace) -> KfreshClient:
    return KfreshClient(addr, **client_options(args))
