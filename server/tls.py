"""Server TLS credentials from config: a certificate and key, optionally a client CA (mutual TLS)."""

from __future__ import annotations

from pathlib import Path

import grpc

from kfresh.core.config import ConfigError, ServerConfig


def _read(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting}: {path} is not a PEM file")
    return data


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when server.tls_cert_file is set (None = plaintext); with a client CA, client certs are required."""
    if cfg.tls_cert_file is None or cfg.tls_key_file is None:
        return None
    pair = (_read(cfg.tls_key_file, "server.tls_key_file"), _read(cfg.tls_cert_file, "server.tls_cert_file"))
    client_ca = _read(cfg.tls_client_ca_file, "server.tls_client_ca_file") if cfg.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)
