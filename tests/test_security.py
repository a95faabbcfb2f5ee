"""Security at the gRPC edge: bearer tokens and scopes, TLS and mutual TLS, secure bind defaults,
message size limits and keepalive-abuse protection, against real servers over loopback.

The servers run the real indexer and embedder with a canned generation backend (no vLLM needed):
what is tested here happens before generation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from server_helper import ServerHandle, server_config

from kfresh.cli import main
from kfresh.client import SERVICE_NAME, KfreshClient, document, tls_credentials
from kfresh.core.config import ConfigError, ServerConfig
from kfresh.server.app import _grpc_options, check_exposure, running_server
from kfresh.server.auth import METHOD_SCOPES, TokenTable, bearer_token, parse_tokens, required_scope
from kfresh.server.generation.base import GenerationBackend, GenerationChunk, GenerationRequest
from kfresh.v1 import kfresh_pb2 as pb
from kfresh.v1 import kfresh_pb2_grpc as pb_grpc

TOKENS = {
    "read": "rd-5d1c0f7e9b2a4c68a1f3",
    "write": "wr-8e2b6a9d3c7f4e10b5d2",
    "admin": "ad-1f4e7b2c9a6d3e58c0a7",
}
UNKNOWN_TOKEN = "xx-0000000000000000dead"


class CannedBackend(GenerationBackend):
    """Answers every question with 'ok.' at once: enough to see an authorised Answer go through."""

    name = "canned"

    @property
    def model(self) -> str:
        return "canned"

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk("ok.", True, "stop", 1)

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> bool:
        return True


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def server_logs() -> Iterator[_Records]:
    """Every kfresh log line at DEBUG from before the auth server starts until the module ends."""
    handler, logger = _Records(), logging.getLogger("kfresh")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def auth_server(
    engine_loop: Any, server_logs: _Records, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    """Tokens from a file, a 1 MB message limit, pings closer than 5 s are strikes (2 tolerated)."""
    tmp = tmp_path_factory.mktemp("auth")
    tokens_file = tmp / "tokens"
    tokens_file.write_text(
        f"# token scopes\n{TOKENS['read']} read\n{TOKENS['write']} write\n{TOKENS['admin']}   admin\n"
    )
    cfg = server_config(
        tmp, server__auth_tokens_file=tokens_file, server__max_message_mb=1,
        server__min_client_ping_interval_s=5.0, server__max_ping_strikes=2,
    )  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, CannedBackend())
    yield handle
    handle.stop()


def _client(server: ServerHandle, scope: str | None) -> KfreshClient:
    return KfreshClient(f"127.0.0.1:{server.port}", token=TOKENS[scope] if scope else None)


def _code(call: Any) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):  # a response stream: drain it
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


CALLS = {
    "Retrieve": lambda c: c.retrieve("lighthouse keeper", timeout=10),
    "Answer": lambda c: c.answer("Who keeps the lighthouse?", timeout=10),
    "Stats": lambda c: c.stats(timeout=10),
    "WaitSearchable": lambda c: c.wait_searchable(5.0, timeout=10),
    "Watch": lambda c: list(c.watch(from_now=True, timeout=1)),
    "ListAdapters": lambda c: c.list_adapters(timeout=10),
    "Ingest": lambda c: c.ingest([document("sec-1", "The Varn lighthouse keeper is Ilse Maro.")], timeout=10),
    "Delete": lambda c: c.delete("sec-never-existed", timeout=10),
    "PromoteAdapter": lambda c: c.promote_adapter("v0001", timeout=10),
    "RollbackAdapter": lambda c: c.rollback_adapter(timeout=10),
    "ListReview": lambda c: c.list_review(timeout=10),
    "DecideReview": lambda c: c.decide_review([424242], approve=True, reviewer="sec", timeout=10),
}
# What an authorised call returns on this server (LoRA off, empty registry): anything but an auth error.
AUTHORISED = {
    "Delete": grpc.StatusCode.NOT_FOUND,
    "PromoteAdapter": grpc.StatusCode.INVALID_ARGUMENT,
    "RollbackAdapter": grpc.StatusCode.INVALID_ARGUMENT,
    "DecideReview": grpc.StatusCode.NOT_FOUND,
    "Watch": grpc.StatusCode.DEADLINE_EXCEEDED,  # a watch runs until the client stops it
}


def test_method_scope_table_and_default_deny() -> None:
    assert {m.rsplit("/", 1)[1]: s for m, s in METHOD_SCOPES.items()} == {
        "Retrieve": "read", "Answer": "read", "Stats": "read", "WaitSearchable": "read", "Watch": "read",
        "ListAdapters": "read",
        "Ingest": "write", "Delete": "write",
        "PromoteAdapter": "admin", "RollbackAdapter": "admin", "Distill": "admin", "ListReview": "admin",
        "DecideReview": "admin", "GetAnswer": "admin", "ReplayAnswer": "admin",
        "Purge": "admin",
    }  # fmt: skip
    assert required_scope("/kfresh.v1.Kfresh/SomethingAddedLater") == "admin"
    assert required_scope("/grpc.health.v1.Health/Check") is None
    assert required_scope("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_token_table_expands_scopes_and_keeps_only_digests() -> None:
    table = TokenTable(parse_tokens([f"{TOKENS['write']} write", f"{TOKENS['read']} read,read"], "t"))
    assert table.scopes(TOKENS["write"]) == {"read", "write"}
    assert table.scopes(TOKENS["read"]) == {"read"}
    assert table.scopes(UNKNOWN_TOKEN) is None and table.scopes("") is None
    assert TOKENS["write"] not in repr(vars(table))
    assert bearer_token([("authorization", f"bearer  {TOKENS['read']} ")]) == TOKENS["read"]
    assert bearer_token([("authorization", "Basic abc")]) is None and bearer_token(None) is None


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("short read", "at least 16"),
        (f"{TOKENS['read']} root", "scopes must be among"),
        (f"{TOKENS['read']}", "expected 'TOKEN SCOPE"),
        (f"{TOKENS['read']} read extra", "a tenant binding is KEY=VALUE"),
    ],
)
def test_bad_token_lines_name_the_line_never_the_token(line: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        parse_tokens(["# comment", "", line], "server.auth_tokens_file x")
    assert "line 3" in str(err.value) and TOKENS["read"] not in str(err.value)


def test_tokens_come_from_file_and_env_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfresh.core.config import load_config

    file = tmp_path / "tokens"
    file.write_text(f"{TOKENS['admin']} admin\n")
    monkeypatch.setenv("KFRESH_SERVER__AUTH_TOKENS", f"{TOKENS['read']} read; {TOKENS['write']} write")
    cfg = load_config({"server.auth_tokens_file": str(file)})
    table = TokenTable.from_config(cfg.server)
    assert len(table) == 3 and table.scopes(TOKENS["admin"]) == {"read", "write", "admin"}
    assert TOKENS["read"] not in cfg.model_dump_json()  # `kfresh config` never prints it
    file.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no tokens"):
        TokenTable.from_config(cfg.server)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_rpc_needs_a_token_and_the_right_scope(auth_server: ServerHandle, method: str) -> None:
    needed = METHOD_SCOPES[f"/kfresh.v1.Kfresh/{method}"]
    with _client(auth_server, None) as anonymous:
        assert _code(lambda: CALLS[method](anonymous)) == grpc.StatusCode.UNAUTHENTICATED
    with KfreshClient(f"127.0.0.1:{auth_server.port}", token=UNKNOWN_TOKEN) as stranger:
        assert _code(lambda: CALLS[method](stranger)) == grpc.StatusCode.UNAUTHENTICATED
    for scope in ("read", "write", "admin"):
        with _client(auth_server, scope) as client:
            allowed = ["read", "write", "admin"].index(scope) >= ["read", "write", "admin"].index(needed)
            expected = AUTHORISED.get(method, grpc.StatusCode.OK) if allowed else grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: CALLS[method](client)) == expected, (method, scope)


def test_denials_say_what_is_missing(auth_server: ServerHandle) -> None:
    with _client(auth_server, None) as anonymous, pytest.raises(grpc.RpcError) as err:
        anonymous.stats(timeout=10)
    assert "authorization: Bearer" in err.value.details()
    with _client(auth_server, "read") as reader, pytest.raises(grpc.RpcError) as err:
        reader.delete("x", timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'write' scope" in err.value.details()


def test_probes_stay_open_without_a_token(auth_server: ServerHandle) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with _client(auth_server, None) as anonymous:
        assert anonymous.health(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        assert "kfresh.v1.Kfresh" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_async_client_sends_its_token(auth_server: ServerHandle, engine_loop: Any) -> None:
    from kfresh.client import AsyncKfreshClient

    async def go() -> tuple[int, list[str]]:
        async with AsyncKfreshClient(f"127.0.0.1:{auth_server.port}", token=TOKENS["write"]) as client:
            acks = [
                a async for a in client.ingest([document("sec-async", "Async clients authenticate too.")], timeout=10)
            ]
            answer = client.answer("Does it work?", closed_book=True, timeout=10)  # the fake model's words only
            deltas = [e.delta async for e in answer if not e.HasField("done")]
            return acks[0].version, deltas

    version, deltas = engine_loop.run(go(), timeout=30)
    assert version == 1 and deltas == ["ok."]


def test_cli_client_commands_take_the_token_from_config(
    auth_server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    addr = f"127.0.0.1:{auth_server.port}"
    assert main(["stats", "--addr", addr, "--timeout", "10"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["read"] + "\n")
    monkeypatch.setenv("KFRESH_CLIENT__TOKEN_FILE", str(token_file))
    assert main(["stats", "--addr", addr, "--timeout", "10", "--json"]) == 0
    assert '"model": "canned"' in capsys.readouterr().out
    monkeypatch.delenv("KFRESH_CLIENT__TOKEN_FILE")
    monkeypatch.setenv("KFRESH_CLIENT__TOKEN", TOKENS["read"])
    assert main(["delete", "x", "--addr", addr, "--timeout", "10"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_tokens_never_reach_the_log(auth_server: ServerHandle, server_logs: _Records) -> None:
    for token in (*TOKENS.values(), UNKNOWN_TOKEN):
        with KfreshClient(f"127.0.0.1:{auth_server.port}", token=token) as client:
            for call in CALLS.values():
                _code(lambda call=call: call(client))
    text = "\n".join(server_logs.lines)
    assert "auth_enabled tokens=3" in text and "auth_denied" in text
    for token in (*TOKENS.values(), UNKNOWN_TOKEN):
        assert token not in text and token[:8] not in text


# -- message size and keepalive --------------------------------------------------------------------
def test_message_limit_applies_both_ways() -> None:
    cfg = server_config(Path("/tmp/unused"), server__max_message_mb=3)
    options = dict(_grpc_options(cfg))
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 3 * 1024 * 1024
    assert (
        options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
        and options["grpc.http2.max_ping_strikes"] == 2
    )
    assert options["grpc.keepalive_permit_without_calls"] == 0


def test_oversize_request_is_resource_exhausted_and_server_keeps_serving(auth_server: ServerHandle) -> None:
    with _client(auth_server, "write") as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.ingest([document("huge", "x" * (2 * 1024 * 1024))], timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()
        assert client.stats(timeout=10).documents >= 0


def _hold_open_stream(channel: grpc.Channel, seconds: float) -> grpc.StatusCode:
    """An Ingest stream that sends nothing for `seconds`, then ends; the status it ended with."""
    stub = pb_grpc.KfreshStub(channel)
    metadata = [("authorization", f"Bearer {TOKENS['write']}")]
    release = threading.Event()

    def requests() -> Iterator[pb.IngestRequest]:
        release.wait(seconds)
        return
        yield

    timer = threading.Timer(seconds, release.set)
    timer.start()
    try:
        return _code(lambda: stub.Ingest(requests(), timeout=seconds + 10, metadata=metadata))
    finally:
        timer.cancel()
        release.set()


def test_keepalive_ping_flood_is_cut_off_while_a_normal_client_works(auth_server: ServerHandle) -> None:
    addr = f"127.0.0.1:{auth_server.port}"
    flood_options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]  # fmt: skip  (grpc clients still space pings >= 1 s apart: strikes against the 5 s minimum)
    start = time.monotonic()
    with grpc.insecure_channel(addr, options=flood_options) as flood:
        assert _hold_open_stream(flood, 8.0) == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 7.0, "the ping flood was not cut off"
    with grpc.insecure_channel(addr) as normal:
        assert _hold_open_stream(normal, 3.0) == grpc.StatusCode.OK
    with _client(auth_server, "read") as client:
        assert client.stats(timeout=10).model == "canned"


# -- secure defaults ------------------------------------------------------------------------------
def test_public_bind_without_auth_refuses_to_start(engine_loop: Any, tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server__host="0.0.0.0")

    async def start() -> None:
        async with running_server(cfg, backend=CannedBackend()):
            pass

    with pytest.raises(ConfigError, match="server.host=0.0.0.0 is not loopback.*allow_insecure_public"):
        engine_loop.run(start(), timeout=30)


def test_exposure_rules(caplog: pytest.LogCaptureFixture) -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        check_exposure(ServerConfig(host=host), auth=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        with pytest.raises(ConfigError, match="server.auth_tokens_file"):
            check_exposure(ServerConfig(host=host), auth=False)
    with caplog.at_level(logging.WARNING, logger="kfresh"):
        check_exposure(ServerConfig(host="0.0.0.0", allow_insecure_public=True), auth=False)
        check_exposure(ServerConfig(host="0.0.0.0"), auth=True)
    assert "INSECURE" in caplog.text and "without TLS" in caplog.text


# -- TLS -----------------------------------------------------------------------------------------
def _pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a stranger CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    out: dict[str, Path] = {}

    def write(name: str, cert: Any, key: Any) -> None:
        out[f"{name}_cert"] = folder / f"{name}.pem"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = folder / f"{name}.key"
        out[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def issue(cn: str, issuer: tuple[Any, Any] | None, *, ca: bool = False, server: bool = False) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer[0].subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key

    ca = issue("kfresh test CA", None, ca=True)
    write("ca", *ca)
    write("server", *issue("localhost", ca, server=True))
    write("client", *issue("kfresh test client", ca))
    write("stranger_ca", *issue("some other CA", None, ca=True))
    write("stranger_client", *issue("stranger client", issue("some other CA", None, ca=True)))
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(
    engine_loop: Any, pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    cfg = server_config(
        tmp_path_factory.mktemp("mtls"), server__tls_cert_file=pki["server_cert"], server__tls_key_file=pki["server_key"],
        server__tls_client_ca_file=pki["ca_cert"], server__auth_tokens=f"{TOKENS['read']} read",
    )  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, CannedBackend())
    yield handle
    handle.stop()


def _tls_stats(port: int, *, host: str = "127.0.0.1", **creds: Any) -> grpc.StatusCode:
    with KfreshClient(f"{host}:{port}", credentials=tls_credentials(**creds), token=TOKENS["read"]) as client:
        return _code(lambda: client.stats(timeout=5))


def test_tls_server_certificate(engine_loop: Any, pki: dict[str, Path], tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server__tls_cert_file=pki["server_cert"], server__tls_key_file=pki["server_key"])
    handle = ServerHandle(engine_loop, cfg, CannedBackend())
    try:
        assert _tls_stats(handle.port, ca_file=pki["ca_cert"]) == grpc.StatusCode.OK
        assert _tls_stats(handle.port, host="localhost", ca_file=pki["ca_cert"]) == grpc.StatusCode.OK
        assert _tls_stats(handle.port, ca_file=pki["stranger_ca_cert"]) == grpc.StatusCode.UNAVAILABLE
        with KfreshClient(f"127.0.0.1:{handle.port}") as plaintext:
            assert _code(lambda: plaintext.stats(timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server: ServerHandle, pki: dict[str, Path]) -> None:
    good = {"ca_file": pki["ca_cert"], "cert_file": pki["client_cert"], "key_file": pki["client_key"]}
    assert _tls_stats(mtls_server.port, **good) == grpc.StatusCode.OK
    assert _tls_stats(mtls_server.port, ca_file=pki["ca_cert"]) == grpc.StatusCode.UNAVAILABLE
    stranger = {
        "ca_file": pki["ca_cert"],
        "cert_file": pki["stranger_client_cert"],
        "key_file": pki["stranger_client_key"],
    }
    assert _tls_stats(mtls_server.port, **stranger) == grpc.StatusCode.UNAVAILABLE
    with KfreshClient(f"127.0.0.1:{mtls_server.port}", credentials=tls_credentials(**good)) as no_token:
        assert _code(lambda: no_token.stats(timeout=5)) == grpc.StatusCode.UNAUTHENTICATED


def test_cli_connects_with_mutual_tls_from_config(
    mtls_server: ServerHandle, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in {
        "TOKEN": TOKENS["read"], "TLS_CA_FILE": pki["ca_cert"], "TLS_CERT_FILE": pki["client_cert"], "TLS_KEY_FILE": pki["client_key"],
    }.items():  # fmt: skip
        monkeypatch.setenv(f"KFRESH_CLIENT__{key}", str(value))
    assert main(["stats", "--addr", f"localhost:{mtls_server.port}", "--timeout", "10", "--json"]) == 0
    assert '"model": "canned"' in capsys.readouterr().out


def test_tls_settings_are_checked(tmp_path: Path, pki: dict[str, Path]) -> None:
    from kfresh.server.tls import server_credentials

    with pytest.raises(ValueError, match="tls_cert_file and server.tls_key_file must be set together"):
        ServerConfig(tls_cert_file=pki["server_cert"])
    with pytest.raises(ValueError, match="needs server.tls_cert_file"):
        ServerConfig(tls_client_ca_file=pki["ca_cert"])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="server.tls_cert_file: .* is not a PEM file"):
        server_credentials(ServerConfig(tls_cert_file=tmp_path / "junk.pem", tls_key_file=pki["server_key"]))
    with pytest.raises(ConfigError, match="server.tls_key_file: cannot read"):
        server_credentials(ServerConfig(tls_cert_file=pki["server_cert"], tls_key_file=tmp_path / "missing.key"))
