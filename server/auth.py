"""Bearer-token authentication and scope checks for every RPC, in one grpc.aio server interceptor.

Each token grants scopes; `admin` implies `write` implies `read`. Methods not in METHOD_SCOPES need
`admin` (deny by default), so a new RPC is locked down until someone decides otherwise. Health checks
and reflection stay open so probes and `grpcurl list` work without a token.

Tokens come from `server.auth_tokens_file` and/or `server.auth_tokens`, entries `TOKEN SCOPE[,SCOPE] [KEY=VALUE ...]`
(one per line, or `;`-separated inline). Only their sha256 digests are kept, compared in constant time;
a token never reaches a log line or an error message. KEY=VALUE pairs bind the token to a tenant: the
server adds them to every filter and stamps them on every document written with it (server/tenancy.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from kfresh.core.config import ConfigError, ServerConfig

log = logging.getLogger("kfresh.server.auth")

SCOPES = ("read", "write", "admin")
IMPLIED = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}
MIN_TOKEN_CHARS = 16
_SERVICE = "/kfresh.v1.Kfresh/"
METHOD_SCOPES = {
    **{_SERVICE + m: "read" for m in ("Retrieve", "Answer", "Stats", "WaitSearchable", "Watch", "ListAdapters")},
    **{_SERVICE + m: "write" for m in ("Ingest", "Delete")},
    **{_SERVICE + m: "admin" for m in ("PromoteAdapter", "RollbackAdapter", "Distill", "ListReview", "DecideReview",
                                       "GetAnswer", "ReplayAnswer", "Purge")},
}  # fmt: skip
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def required_scope(method: str) -> str | None:
    """The scope `method` needs; None for the open probe services; 'admin' for anything unlisted."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return METHOD_SCOPES.get(method, "admin")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_fingerprint(token: str) -> str:
    """A short, non-secret name for a token (the start of its sha256): what audit records may keep."""
    return _digest(token).hex()[:12]


class Grant(NamedTuple):
    """What one token may do: its scopes (expanded) and the tenant binding every request with it carries."""

    scopes: frozenset[str]
    binding: Mapping[str, str]


class TokenTable:
    """sha256(token) -> its Grant (scopes expanded: admin ⊇ write ⊇ read)."""

    def __init__(self, grants: Iterable[Sequence[Any]]) -> None:
        """`grants`: (token, scopes) or (token, scopes, binding) entries."""
        self._grants: list[tuple[bytes, Grant]] = []
        for token, scopes, *rest in grants:
            expanded: set[str] = set()
            for scope in scopes:
                expanded |= IMPLIED[scope]
            binding = dict(rest[0]) if rest else {}
            self._grants.append((_digest(token), Grant(frozenset(expanded), binding)))

    def __len__(self) -> int:
        return len(self._grants)

    def grant(self, token: str) -> Grant | None:
        """The Grant of `token`, None when unknown; every entry is compared so timing does not reveal which."""
        presented = _digest(token)
        found: Grant | None = None
        for digest, grant in self._grants:
            if hmac.compare_digest(presented, digest):
                found = grant
        return found

    def scopes(self, token: str) -> frozenset[str] | None:
        grant = self.grant(token)
        return grant.scopes if grant is not None else None

    def binding(self, metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
        """The tenant binding of the request's bearer token ({} without one: the interceptor has already
        refused unknown tokens when authentication is on)."""
        token = bearer_token(metadata)
        grant = self.grant(token) if token is not None else None
        return dict(grant.binding) if grant is not None else {}

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> TokenTable:
        """Tokens from the file and the inline setting; ConfigError (naming the setting and line, never the token)."""
        grants: list[tuple[str, list[str], dict[str, str]]] = []
        if cfg.auth_tokens_file is not None:
            try:
                text = Path(cfg.auth_tokens_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"server.auth_tokens_file: cannot read {cfg.auth_tokens_file}: {exc.__class__.__name__}"
                ) from None
            grants = parse_grants(text.splitlines(), f"server.auth_tokens_file {cfg.auth_tokens_file}")
            if not grants:  # an emptied file must not silently turn authentication off
                raise ConfigError(f"server.auth_tokens_file {cfg.auth_tokens_file} holds no tokens")
        inline = cfg.auth_tokens.get_secret_value()
        if inline.strip():
            grants += parse_grants(inline.replace(";", "\n").splitlines(), "server.auth_tokens entry")
        return cls(grants)


def parse_tokens(lines: Iterable[str], where: str) -> list[tuple[str, list[str]]]:
    """(token, scopes) of `TOKEN SCOPE[,SCOPE] [KEY=VALUE ...]` entries (bindings: parse_grants)."""
    return [(token, scopes) for token, scopes, _ in parse_grants(lines, where)]


def parse_grants(lines: Iterable[str], where: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """`TOKEN SCOPE[,SCOPE] [KEY=VALUE ...]` entries; blank lines and `#` comments are skipped."""
    grants = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ConfigError(f"{where} line {number}: expected 'TOKEN SCOPE[,SCOPE] [KEY=VALUE ...]'")
        token, scopes = parts[0], [s.strip() for s in parts[1].split(",") if s.strip()]
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{where} line {number}: tokens must be at least {MIN_TOKEN_CHARS} characters")
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ConfigError(
                f"{where} line {number}: scopes must be among {', '.join(SCOPES)}; got {unknown or 'none'}"
            )
        binding: dict[str, str] = {}
        for pair in parts[2:]:
            key, eq, value = pair.partition("=")
            if not eq or not key or not value or key in binding:
                raise ConfigError(f"{where} line {number}: a tenant binding is KEY=VALUE, each key once; got {pair!r}")
            binding[key] = value
        grants.append((token, scopes, binding))
    return grants


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header, None when there is none."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = str(value).strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails at once; the request is never decoded."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    raw = {"request_deserializer": None, "response_serializer": None}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **raw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **raw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **raw)
    return grpc.unary_unary_rpc_method_handler(deny, **raw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known bearer token, PERMISSION_DENIED when its scopes fall short."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        needed = required_scope(method)
        handler = await continuation(handler_call_details)
        if needed is None or handler is None:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        scopes = self._tokens.scopes(token) if token is not None else None
        if scopes is None:
            reason = "missing" if token is None else "unknown"
            log.warning("auth_denied method=%s reason=%s_token", method, reason)
            return _denied(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a valid 'authorization: Bearer <token>' header ({reason} token)",
            )
        if needed not in scopes:
            log.warning(
                "auth_denied method=%s reason=scope needed=%s granted=%s", method, needed, ",".join(sorted(scopes))
            )
            return _denied(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the '{needed}' scope; this token has {sorted(scopes)}",
            )
        return handler
