"""Container HEALTHCHECK for `kfresh serve`: a grpc.health.v1 Check against the configured gRPC port.

Exit 0 when the service is SERVING, 1 otherwise. The port comes from kfresh's own config (defaults <
kfresh.toml < KFRESH_* env), so the check follows `KFRESH_SERVER__PORT`. The default service,
`kfresh.v1.Kfresh`, is SERVING once the index is loaded (Retrieve and Ingest work); `""` also needs the
generation model. Health checks need no bearer token; with `server.tls_cert_file` set this plaintext
check fails, so override HEALTHCHECK then (grpc_health_probe -tls, or a TLS channel).
Usage: python healthcheck.py [SERVICE]
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kfresh.core.config import load_config


def main(argv: list[str]) -> int:
    service = argv[1] if len(argv) > 1 else "kfresh.v1.Kfresh"
    port = load_config().server.port
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3.0
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name} on 127.0.0.1:{port}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
