"""Settings of the service's edges: NATS ingestion, metrics, the gRPC server (auth, TLS, limits), clients."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from kfresh.core.config.section import Section


class NatsConfig(Section):
    """`kfresh consume`: documents from a NATS JetStream stream into a kfresh server (at-least-once)."""

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated for a cluster.")
    stream: str = Field("KFRESH", description="JetStream stream that holds the document messages.")
    subject: str = Field(
        "kfresh.docs", description="Subject of the document messages (JSON like `kfresh ingest` JSONL lines)."
    )
    durable: str = Field("kfresh-ingest", description="Durable pull consumer name; its position survives restarts.")
    create_stream: bool = Field(True, description="Create the stream (file storage) when it does not exist.")
    ack_wait_s: float = Field(
        60.0, gt=0, description="A delivered message not acknowledged within this is redelivered."
    )
    fetch_timeout_s: float = Field(1.0, gt=0, description="How long one fetch waits for messages.")
    retry_delay_s: float = Field(
        2.0, ge=0, description="Redelivery delay after the kfresh server was unavailable or overloaded."
    )
    dead_letter_subject: str = Field(
        "kfresh.dead",
        description="Where messages kfresh can never accept go (with the reason in a header); '' = drop them.",
    )


class MetricsConfig(Section):
    """The Prometheus /metrics endpoint of `kfresh serve`."""

    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP.")
    host: str = Field("127.0.0.1", description="Interface of the metrics endpoint; localhost by default.")
    port: int = Field(9464, ge=0, le=65535, description="Metrics HTTP port (0 = pick a free one; the log names it).")


class ServerConfig(Section):
    host: str = Field("127.0.0.1", description="Interface to bind; localhost by default.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    grace_s: float = Field(5.0, ge=0, description="Seconds in-flight calls get to finish on shutdown.")
    max_message_mb: int = Field(8, ge=1, le=256, description="Largest gRPC message accepted or sent.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="Structured JSON logs instead of key=value text.")
    auth_tokens_file: Path | None = Field(
        None,
        description="Bearer tokens, one 'TOKEN SCOPE[,SCOPE]' per line (scopes read, write, admin; # comments). "
        "With auth_tokens, unset = no authentication.",
    )
    auth_tokens: SecretStr = Field(
        SecretStr(""),
        description="Bearer tokens inline, 'TOKEN SCOPE[,SCOPE]' entries separated by ';' or newlines; "
        "set it through KFRESH_SERVER__AUTH_TOKENS rather than a flag (flags show in ps).",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain); set with tls_key_file = TLS only."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle client certificates must chain to; set = mutual TLS (a client certificate is required).",
    )
    allow_insecure_public: bool = Field(
        False,
        description="Start on a non-loopback host without authentication anyway (logged as a warning); off = refuse.",
    )
    keepalive_time_s: float = Field(
        60.0, gt=0, description="The server pings a connection idle this long to find dead peers."
    )
    keepalive_timeout_s: float = Field(
        20.0, gt=0, description="A peer that does not answer a ping within this is disconnected."
    )
    min_client_ping_interval_s: float = Field(
        10.0, ge=0, description="Client keepalive pings closer together than this are strikes (abuse protection)."
    )
    max_ping_strikes: int = Field(
        2, ge=1, description="Too-frequent pings tolerated before the connection is closed (GOAWAY too_many_pings)."
    )
    keepalive_permit_without_calls: bool = Field(
        False,
        description="Accept client keepalive pings on connections with no call in flight (off = they count as strikes).",
    )

    @model_validator(mode="after")
    def _tls_files_come_in_pairs(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "server.tls_client_ca_file (mutual TLS) needs server.tls_cert_file and server.tls_key_file"
            )
        return self


class ClientConfig(Section):
    """How the client commands (ingest, ask, retrieve, delete, stats, adapters) reach a secured server."""

    token: SecretStr = Field(
        SecretStr(""), description="Bearer token to send; set it through KFRESH_CLIENT__TOKEN or token_file."
    )
    token_file: Path | None = Field(None, description="File whose first line is the bearer token (wins over token).")
    tls_ca_file: Path | None = Field(
        None, description="PEM root certificate(s) that sign the server's; set = connect with TLS."
    )
    tls_cert_file: Path | None = Field(None, description="PEM client certificate for mutual TLS (with tls_key_file).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_server_name: str = Field(
        "", description="Name checked against the server certificate when it differs from the address host."
    )
