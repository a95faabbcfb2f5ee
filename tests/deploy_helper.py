"""Shared by the checks of deploy/ (tests/test_deploy*.py): where its files are, what kfresh's own code
says about a container's settings and command line, the images' ENV, and the checks that the Kubernetes
manifests and the compose file both make (the `vllm serve` command line, the placeholder tokens)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from kfresh.cli import build_parser
from kfresh.core.config import KfreshConfig
from kfresh.models import GENERATOR_NAME
from kfresh.server.auth import parse_tokens, required_scope

yaml = pytest.importorskip("yaml")  # deploy/ is YAML: every test module that imports this one skips without it

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
HEALTH_SERVICE = "kfresh.v1.Kfresh"
# Settings that hold a password or a key: from a Secret (k8s) or an env_file under secrets/ (compose), never inline.
SECRET_ENV = ("KFRESH_STORE__DSN", "KFRESH_INDEX__MILVUS_TOKEN", "KFRESH_SERVER__AUTH_TOKENS", "KFRESH_CLIENT__TOKEN")
# Read by kfresh directly, not config fields: the data folder, the TOML file, the client address.
PLAIN_ENV = ("KFRESH_HOME", "KFRESH_CONFIG", "KFRESH_ADDR")


# -- what the code says ---------------------------------------------------------------------------


def config_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> KfreshConfig:
    """The config a container with exactly `env` (its KFRESH_* part) would load; validates every value."""
    for key in [k for k in os.environ if k.startswith("KFRESH_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("KFRESH_CONFIG", "/nonexistent/kfresh.toml")
    for key, value in env.items():
        if key.startswith("KFRESH_") and key not in PLAIN_ENV:
            monkeypatch.setenv(key, value)
    return KfreshConfig()


def check_kfresh_command(argv: list[str]) -> None:
    """`kfresh SUBCOMMAND ...` parses with the real CLI parser (unknown subcommands or flags fail)."""
    assert argv[0] == "kfresh", argv
    try:
        build_parser().parse_args(argv[1:])
    except (SystemExit, argparse.ArgumentError) as exc:
        pytest.fail(f"`{' '.join(argv)}` is not a valid kfresh command line ({exc})")


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def image_path(path: Path) -> str:
    """A config path as the container sees it: the defaults are relative to KFRESH_HOME (.kfresh here)."""
    if not path.is_absolute() and path.parts[:1] == (".kfresh",):
        return str(Path(dockerfile_env(DOCKERFILES["cpu"])["KFRESH_HOME"]).joinpath(*path.parts[1:]))
    return str(path)


def parse_dockerfile(path: Path) -> list[Any]:
    dockerfile = pytest.importorskip("dockerfile", reason="dockerfile (BuildKit's parser) not installed")
    return list(dockerfile.parse_file(str(path)))


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of the final stage (what a container starts with)."""
    commands = parse_dockerfile(path)
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    env: dict[str, str] = {}
    for c in commands[last_from:]:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=False))
    return env


# -- reading rendered Kubernetes manifests ----------------------------------------------------------


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "CronJob", "Job"):
            for container in pod_spec(doc)["containers"]:
                yield doc, container


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container starts with: its ConfigMaps, then its own entries (values and Secret keys)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        cm = find(docs, "ConfigMap", source["configMapRef"]["name"])
        assert cm is not None, source
        env.update(cm["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        secret = find(docs, "Secret", ref["name"])
        data = (secret or {}).get("stringData", {})
        assert ref["key"] in data or ref.get("optional"), (
            f"{entry['name']}: no key {ref['key']!r} in Secret {ref['name']}"
        )
        if ref["key"] in data:
            env[entry["name"]] = data[ref["key"]]
    return env


def volume_at(doc: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that holds `path` in the container (the deepest mount above it)."""
    mounts = [
        m
        for m in container["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume (the container's own layer)"
    name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    return next(v for v in pod_spec(doc)["volumes"] if v["name"] == name)


def mounted_secret_key(
    docs: list[dict[str, Any]], doc: dict[str, Any], container: dict[str, Any], path: str
) -> str | None:
    volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        for item in secret.get("items", []):
            if f"{mount['mountPath']}/{item['path']}" == path:
                assert item["key"] in find(docs, "Secret", secret["secretName"])["stringData"]  # type: ignore[index]
                return str(item["key"])
    return None


# -- checked in both the Kubernetes manifests and the compose file -----------------------------------


def vllm_flags_agree(argv: list[str], cfg: KfreshConfig) -> None:
    """A `vllm serve` command line against the kfresh config of the server that talks to it."""
    assert argv[:2] == ["vllm", "serve"]
    # The model baked into the image: models.cache_dir / the converted generator (Dockerfile ENV).
    image_cache_dir = dockerfile_env(DOCKERFILES["cpu"])["KFRESH_MODELS__CACHE_DIR"]
    assert argv[2] == f"{image_cache_dir}/{GENERATOR_NAME}"
    assert flag(argv, "--served-model-name") == cfg.generation.remote_model
    assert int(flag(argv, "--max-model-len")) == cfg.generation.max_model_len
    url = urlparse(cfg.generation.remote_url)
    assert int(flag(argv, "--port")) == url.port and flag(argv, "--host") == "0.0.0.0"
    assert ("--enable-lora" in argv) == cfg.generation.enable_lora
    if cfg.generation.enable_lora:
        assert int(flag(argv, "--max-lora-rank")) >= cfg.finetune.lora_rank
        assert int(flag(argv, "--max-loras")) >= cfg.generation.max_loras


def check_token_files(server_tokens: str, clients: dict[str, str]) -> None:
    """The server's tokens parse (server/auth.py); each client token has the scope its RPC needs."""
    grants = dict(parse_tokens(server_tokens.splitlines(), "deploy tokens"))
    assert all("CHANGE-ME" in token for token in grants), "deploy/ must hold placeholder tokens only"
    needs = {
        "ingest-token": "/kfresh.v1.Kfresh/Ingest",
        "admin-token": "/kfresh.v1.Kfresh/Distill",
        "read-token": "/kfresh.v1.Kfresh/Answer",
    }
    implied = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}
    for name, token in clients.items():
        scopes = set().union(*(implied[s] for s in grants[token.strip()]))
        assert required_scope(needs[name]) in scopes, name
