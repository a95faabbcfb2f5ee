"""deploy/compose/ and deploy/prometheus/: the compose file validates against the compose-spec schema and
its services, ports, KFRESH_* settings, `kfresh` command lines, replicas and secrets agree with kfresh's own
code; the Prometheus config passes promtool. Nothing is started here: no container runtime exists on CI."""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from deploy_helper import (
    COMPOSE,
    DEPLOY,
    DOCKERFILES,
    SECRET_ENV,
    check_kfresh_command,
    check_token_files,
    config_from_env,
    dockerfile_env,
    flag,
    image_path,
    vllm_flags_agree,
    yaml,
)

from kfresh.core.config import KfreshConfig
from kfresh.indexer.follower import follow_enabled


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (vendored compose-spec schema) not installed")
    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = {**compose, "services": {"x": {"image": "a", "comand": ["kfresh", "serve"]}}}  # a typo'd key
    assert list(validator.iter_errors(broken)), "the schema check must catch a bad service"


def compose_env(svc: dict[str, Any]) -> dict[str, str]:
    """What compose puts in the container: the env_file(s), then `environment` (which wins)."""
    env: dict[str, str] = {}
    files = svc.get("env_file", [])
    for entry in [files] if isinstance(files, str) else files:
        path = COMPOSE.parent / (entry if isinstance(entry, str) else entry["path"])
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, sep, value = line.partition("=")
                assert sep, f"{path}: {line!r}"
                env[key.strip()] = value
    env.update({k: str(v) for k, v in svc.get("environment", {}).items()})
    return env


def compose_servers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if svc.get("command", [])[:2] == ["kfresh", "serve"]}


def test_compose_agrees_with_the_code(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    here = COMPOSE.parent
    services = compose["services"]
    servers = compose_servers(services)
    assert len(servers) >= 2 and {"vllm", "consume", "nats", "prometheus", "postgres", "milvus"} <= set(services)
    image_env = dockerfile_env(DOCKERFILES["cpu"])
    cfgs = {name: config_from_env({**image_env, **compose_env(svc)}, monkeypatch) for name, svc in servers.items()}
    # The name clients dial: a network alias every replica answers to.
    addressed = {
        name
        for name, svc in servers.items()
        if "kfresh" in svc.get("networks", {}).get("default", {}).get("aliases", [])
    }
    assert addressed == set(servers), "every replica must answer to the alias `kfresh`"
    for name, svc in services.items():
        if "build" in svc:
            assert (here / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"] or (here / source).exists(), f"{name}: {volume}"
        if svc.get("command", [""])[0] == "kfresh":
            check_kfresh_command(svc["command"])
            if "--addr" in svc["command"]:
                host, _, port = flag(svc["command"], "--addr").rpartition(":")
                assert host == "kfresh" and all(int(port) == cfg.server.port for cfg in cfgs.values())
        for key in SECRET_ENV:  # passwords and tokens only through env_file / secrets, never inline
            assert key not in svc.get("environment", {}), f"{name}: {key} inline"
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    host_ports = [p.split(":")[1] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports
    for name, cfg in cfgs.items():
        assert cfg.server.auth_tokens_file is not None
        assert {int(p.split(":")[-1]) for p in servers[name]["ports"]} == {cfg.server.port, cfg.metrics.port}
        assert urlparse(cfg.generation.remote_url).hostname == "vllm"
        vllm_flags_agree(services["vllm"]["command"], cfg)
    check_compose_replicas(compose, servers, cfgs, image_env)
    secret_files = {k: (here / v["file"]).read_text() for k, v in compose["secrets"].items()}
    token_file = {s: services[s]["environment"]["KFRESH_CLIENT__TOKEN_FILE"] for s in ("consume", "distill")}
    assert token_file == {"consume": "/run/secrets/kfresh_ingest_token", "distill": "/run/secrets/kfresh_admin_token"}
    check_token_files(secret_files["kfresh_server_tokens"], {
        "ingest-token": secret_files["kfresh_ingest_token"], "admin-token": secret_files["kfresh_admin_token"],
        "read-token": (here / "secrets" / "read-token.example").read_text(),
    })  # fmt: skip
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {f"{name}:{cfg.metrics.port}" for name, cfg in cfgs.items()} <= targets


def check_compose_replicas(
    compose: dict[str, Any],
    servers: dict[str, dict[str, Any]],
    cfgs: dict[str, KfreshConfig],
    image_env: dict[str, str],
) -> None:
    """The replicas share one PostgreSQL store, one Milvus collection and the adapter registry (with LoRA),
    and each has its own KFRESH_HOME; the DSN matches the postgres service and its password secret."""
    services, here = compose["services"], COMPOSE.parent
    dsns = {cfg.store.dsn.get_secret_value() for cfg in cfgs.values()}
    uris = {(cfg.index.milvus_uri, cfg.index.milvus_collection) for cfg in cfgs.values()}
    assert len(dsns) == 1 and len(uris) == 1, (len(dsns), uris)
    for name, cfg in cfgs.items():
        assert cfg.store.kind == "postgres" and follow_enabled(cfg) and cfg.index.kind == "milvus", name
        needs = {dep for dep, cond in servers[name]["depends_on"].items() if cond["condition"] == "service_healthy"}
        assert {"postgres", "milvus", "vllm"} <= needs, name
    dsn = urlparse(dsns.pop())
    postgres = services[dsn.hostname or ""]
    assert postgres["image"].startswith("postgres:") and (dsn.port or 5432) == 5432
    pg_env = postgres["environment"]
    assert (dsn.username, dsn.path) == (pg_env["POSTGRES_USER"], "/" + pg_env["POSTGRES_DB"])
    secret = pg_env["POSTGRES_PASSWORD_FILE"].removeprefix("/run/secrets/")
    assert secret in postgres["secrets"]
    password = (here / compose["secrets"][secret]["file"]).read_text().strip()
    assert dsn.password == password and "CHANGE-ME" in password
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    uri = urlparse(uris.pop()[0])
    milvus = services[uri.hostname or ""]
    assert uri.scheme == "http" and uri.port == 19530 and milvus["image"].startswith("milvusdb/milvus:")
    assert milvus["command"] == ["milvus", "run", "standalone"] and "healthcheck" in milvus
    home = image_env["KFRESH_HOME"]
    homes = [next(v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == home) for svc in servers.values()]
    assert len(set(homes)) == len(homes), f"each replica needs its own {home} volume: {homes}"
    if any(cfg.generation.enable_lora for cfg in cfgs.values()):
        registry = str(Path(home) / "adapters")
        assert all(image_path(cfg.finetune.registry_dir) == registry for cfg in cfgs.values())
        mounts = {
            svc: [v.split(":")[0] for v in services[svc]["volumes"] if v.split(":")[1] == registry]
            for svc in [*servers, "vllm"]
        }
        assert len({tuple(m) for m in mounts.values()}) == 1 and all(mounts.values()), mounts
        assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs the Debian package prometheus)")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
