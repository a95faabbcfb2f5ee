"""What every command group shares: config flags, the server address, client options, JSON output."""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from kfresh.core.config import KfreshConfig, load_config

ADDR_HELP = "server address host:port (default 127.0.0.1:50051, or $KFRESH_ADDR)"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--section.field` flag per setting, with the field's description as help."""
    for section, info in KfreshConfig.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        group = parser.add_argument_group(
            f"{section} settings (also KFRESH_{section.upper()}__FIELD or [{section}] in kfresh.toml)"
        )
        for name, field in model.model_fields.items():
            choices = (
                typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
            )
            is_list = typing.get_origin(field.annotation) is list
            default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
            group.add_argument(
                f"--{section}.{name}",
                dest=f"cfg:{section}.{name}",
                metavar=name.upper() if not choices else None,
                choices=choices,
                default=None,
                type=_comma_list if is_list else str,
                help=f"{field.description}{' (comma-separated)' if is_list else ''} [default: {default}]",
            )


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def config_from(args: argparse.Namespace) -> KfreshConfig:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return load_config(overrides)


def server_addr(args: argparse.Namespace) -> str:
    import os

    return args.addr or os.environ.get("KFRESH_ADDR", "127.0.0.1:50051")


def client_options() -> dict[str, Any]:
    """Token and TLS for client commands, from the `client` settings (KFRESH_CLIENT__* or [client] in kfresh.toml)."""
    from kfresh.client import connect_options

    return connect_options(load_config().client)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=None))


def message_dict(msg: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    out: dict[str, Any] = MessageToDict(msg, preserving_proto_field_name=True)
    return out


def client_parser(sub: Any, name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    p.add_argument("--addr", help=ADDR_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.set_defaults(func=func)
    return p


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    """The filter flags `ask` and `retrieve` share: all of them must hold."""
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata KEY equals VALUE (repeatable)")
    p.add_argument("--in", dest="any_of", action="append", metavar="KEY=V1,V2",
                   help="metadata KEY is one of the comma-separated values (repeatable)")  # fmt: skip
    p.add_argument("--source", action="append", metavar="GLOB", help="the document's source matches GLOB (* ? [...]; "
                   "repeatable: any of them)")  # fmt: skip
    p.add_argument("--since", metavar="TIME", help="valid_from at or after TIME (ISO-8601 or unix seconds)")
    p.add_argument("--until", metavar="TIME", help="valid_from before TIME (ISO-8601 or unix seconds)")
    p.add_argument("--as-of", metavar="TIME", help="the knowledge base as it stood at TIME: versions acknowledged "
                   "by then and not yet replaced or deleted (ISO-8601 or unix seconds)")  # fmt: skip
    p.add_argument("--valid-at", metavar="TIME", help="what the documents say was true at TIME (world time: each "
                   "version from its valid_from until the next one's)")  # fmt: skip


def parse_times(args: argparse.Namespace) -> dict[str, float]:
    """The as_of / valid_at of add_filter_flags' --as-of / --valid-at (only those given)."""
    from kfresh.client.sources import SourceError, parse_time

    try:
        times = {"as_of": parse_time(args.as_of, "--as-of"), "valid_at": parse_time(args.valid_at, "--valid-at")}
    except SourceError as exc:
        raise SystemExit(str(exc).replace("valid_from ", "")) from None
    return {k: v for k, v in times.items() if v is not None}


def parse_where(args: argparse.Namespace) -> Any:
    """The `where` Filter message of add_filter_flags' flags, or None when none was given."""
    from kfresh.client import where
    from kfresh.client.sources import SourceError, parse_time

    any_of: dict[str, list[str]] = {}
    for pair in args.any_of or []:
        key, sep, values = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--in expects KEY=V1,V2, got {pair!r}")
        any_of.setdefault(key, []).extend(v for v in values.split(",") if v)
    try:
        since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    except SourceError as exc:
        raise SystemExit(str(exc).replace("valid_from ", "")) from None
    if not (any_of or args.source or since is not None or until is not None):
        return None
    return where(any_of=any_of, source=args.source or (), valid_from_min=since, valid_from_max=until)


def parse_filters(pairs: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--filter expects key=value, got {pair!r}")
        out[key] = value
    return out
